//! `#[derive(ParamSet)]`: the params of a stage kind (or of a library config they build) declared
//! once, as one struct whose fields carry their defaults, ranges and doc comments. The derive
//! writes `dag_api::ParamSet::param_specs` (from which the engine validates pipeline files and
//! `dag kinds` documents every param) and `Default` (the declared defaults), so that no default,
//! range or doc is written a second time.
//!
//! Field attributes, `#[param(...)]`, comma-separated:
//! - `default = EXPR`: the default, any value `serde_json::json!` takes; without it the param
//!   is required, unless the field is an `Option` (default `null`);
//! - `min = EXPR`, `max = EXPR`, `min_exclusive`: bounds of a number (unsigned integers have
//!   `min = 0` unless told);
//! - `one_of = EXPR`: a string that must be one of `EXPR.iter()` (`&'static str` items);
//! - `path`, `dataset`: a string that is a path relative to the pipeline file, or the name of
//!   an entry of `datasets:`;
//! - `flatten`: the field is another `ParamSet` whose params are this struct's too (pair it
//!   with `#[serde(flatten)]`).
//!
//! The doc comment of a field is the param's documentation.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::quote;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::{
    parse_macro_input, Data, DeriveInput, Expr, ExprLit, Fields, GenericArgument, Lit, Meta,
    PathArguments, Token, Type,
};

/// Derives `dag_api::ParamSet` and `Default` for a struct of params; see the crate docs.
#[proc_macro_derive(ParamSet, attributes(param))]
pub fn derive_params(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(t) => t.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

#[derive(Default)]
struct FieldAttrs {
    default: Option<Expr>,
    min: Option<Expr>,
    max: Option<Expr>,
    min_exclusive: bool,
    one_of: Option<Expr>,
    path: bool,
    dataset: bool,
    flatten: bool,
}

fn field_attrs(field: &syn::Field) -> syn::Result<(FieldAttrs, String)> {
    let mut attrs = FieldAttrs::default();
    let mut doc = Vec::new();
    for attr in &field.attrs {
        if attr.path().is_ident("doc") {
            if let Meta::NameValue(nv) = &attr.meta {
                if let Expr::Lit(ExprLit {
                    lit: Lit::Str(s), ..
                }) = &nv.value
                {
                    doc.push(s.value().trim().to_string());
                }
            }
            continue;
        }
        if !attr.path().is_ident("param") {
            continue;
        }
        let items = Punctuated::<Meta, Token![,]>::parse_terminated
            .parse2(attr.meta.require_list()?.tokens.clone())?;
        for item in items {
            match &item {
                Meta::Path(p) if p.is_ident("min_exclusive") => attrs.min_exclusive = true,
                Meta::Path(p) if p.is_ident("path") => attrs.path = true,
                Meta::Path(p) if p.is_ident("dataset") => attrs.dataset = true,
                Meta::Path(p) if p.is_ident("flatten") => attrs.flatten = true,
                Meta::NameValue(nv) if nv.path.is_ident("default") => {
                    attrs.default = Some(nv.value.clone())
                }
                Meta::NameValue(nv) if nv.path.is_ident("min") => {
                    attrs.min = Some(nv.value.clone())
                }
                Meta::NameValue(nv) if nv.path.is_ident("max") => {
                    attrs.max = Some(nv.value.clone())
                }
                Meta::NameValue(nv) if nv.path.is_ident("one_of") => {
                    attrs.one_of = Some(nv.value.clone())
                }
                other => {
                    return Err(syn::Error::new_spanned(
                        other,
                        "expected default = .., min = .., max = .., min_exclusive, one_of = .., \
                         path, dataset or flatten",
                    ))
                }
            }
        }
    }
    Ok((attrs, doc.join(" ")))
}

/// The single type argument of `Option<T>`, `Vec<T>` and the like.
fn type_argument(ty: &Type) -> Option<&Type> {
    let Type::Path(p) = ty else { return None };
    let PathArguments::AngleBracketed(args) = &p.path.segments.last()?.arguments else {
        return None;
    };
    args.args.iter().find_map(|a| match a {
        GenericArgument::Type(t) => Some(t),
        _ => None,
    })
}

fn type_name(ty: &Type) -> Option<String> {
    let Type::Path(p) = ty else { return None };
    Some(p.path.segments.last()?.ident.to_string())
}

/// The `dag_api::ParamType` of a Rust type, the attributes applying to its innermost scalar.
fn param_type(ty: &Type, a: &FieldAttrs) -> syn::Result<Tokens> {
    if let Type::Array(arr) = ty {
        let inner = param_type(&arr.elem, a)?;
        let len = &arr.len;
        return Ok(quote! {
            ::dag_api::ParamType::Tuple(::std::iter::repeat(#inner).take(#len).collect())
        });
    }
    let name =
        type_name(ty).ok_or_else(|| syn::Error::new_spanned(ty, "unsupported param type"))?;
    let opt = |e: &Option<Expr>| match e {
        Some(e) => quote! { ::core::option::Option::Some(#e) },
        None => quote! { ::core::option::Option::None },
    };
    Ok(match name.as_str() {
        "Option" => param_type(type_argument(ty).expect("Option<T>"), a)?,
        "Vec" => {
            let inner = param_type(type_argument(ty).expect("Vec<T>"), a)?;
            quote! { ::dag_api::ParamType::List(::std::boxed::Box::new(#inner)) }
        }
        "BTreeMap" | "HashMap" => quote! { ::dag_api::ParamType::StrMap },
        "bool" => quote! { ::dag_api::ParamType::Bool },
        "f32" | "f64" => {
            let (min, max, excl) = (opt(&a.min), opt(&a.max), a.min_exclusive);
            quote! { ::dag_api::ParamType::Float { min: #min, max: #max, min_exclusive: #excl } }
        }
        "usize" | "u8" | "u16" | "u32" | "u64" | "isize" | "i8" | "i16" | "i32" | "i64" => {
            let unsigned = name.starts_with('u');
            let min = match &a.min {
                Some(e) => quote! { ::core::option::Option::Some(#e) },
                None if unsigned => quote! { ::core::option::Option::Some(0) },
                None => quote! { ::core::option::Option::None },
            };
            let max = opt(&a.max);
            quote! { ::dag_api::ParamType::Int { min: #min, max: #max } }
        }
        "PathBuf" => quote! { ::dag_api::ParamType::Path },
        "String" => {
            if let Some(options) = &a.one_of {
                quote! { ::dag_api::ParamType::Enum((#options).iter().copied().collect()) }
            } else if a.path {
                quote! { ::dag_api::ParamType::Path }
            } else if a.dataset {
                quote! { ::dag_api::ParamType::Dataset }
            } else {
                quote! { ::dag_api::ParamType::Str }
            }
        }
        _ => {
            return Err(syn::Error::new_spanned(
                ty,
                "unsupported param type; use bool, an integer, f64, String, PathBuf, Option, \
                 Vec, an array or a map",
            ))
        }
    })
}

fn expand(input: &DeriveInput) -> syn::Result<Tokens> {
    let name = &input.ident;
    let Data::Struct(data) = &input.data else {
        return Err(syn::Error::new_spanned(
            input,
            "ParamSet is derived for structs",
        ));
    };
    let Fields::Named(fields) = &data.fields else {
        return Err(syn::Error::new_spanned(
            input,
            "ParamSet needs named fields",
        ));
    };
    let mut specs = Vec::new();
    let mut defaults = Vec::new();
    let mut all_defaulted = true;
    for field in &fields.named {
        let ident = field.ident.as_ref().expect("named field");
        let (attrs, doc) = field_attrs(field)?;
        let ty = &field.ty;
        if attrs.flatten {
            specs.push(quote! {
                specs.extend(<#ty as ::dag_api::ParamSet>::param_specs());
            });
            defaults.push(quote! { #ident: ::core::default::Default::default() });
            continue;
        }
        let param = ident.to_string();
        let param = param.trim_start_matches("r#");
        let pty = param_type(ty, &attrs)?;
        let is_option = type_name(ty).as_deref() == Some("Option");
        let default = match (&attrs.default, is_option) {
            (Some(e), _) => {
                defaults.push(quote! {
                    #ident: ::serde_json::from_value(::serde_json::json!(#e)).expect(
                        concat!("the declared default of `", #param, "` has its field's type"),
                    )
                });
                quote! { ::core::option::Option::Some(::serde_json::json!(#e)) }
            }
            (None, true) => {
                defaults.push(quote! { #ident: ::core::option::Option::None });
                quote! { ::core::option::Option::Some(::serde_json::Value::Null) }
            }
            (None, false) => {
                all_defaulted = false;
                quote! { ::core::option::Option::None }
            }
        };
        if doc.is_empty() {
            return Err(syn::Error::new_spanned(
                field,
                "document every param with a doc comment: it is what `dag kinds` prints",
            ));
        }
        specs.push(quote! {
            specs.push(::dag_api::ParamSpec {
                name: #param,
                ty: #pty,
                default: #default,
                doc: #doc,
            });
        });
    }
    let default_impl = all_defaulted.then(|| {
        quote! {
            #[automatically_derived]
            impl ::core::default::Default for #name {
                fn default() -> Self {
                    Self { #(#defaults),* }
                }
            }
        }
    });
    Ok(quote! {
        #[automatically_derived]
        impl ::dag_api::ParamSet for #name {
            fn param_specs() -> ::std::vec::Vec<::dag_api::ParamSpec> {
                let mut specs = ::std::vec::Vec::new();
                #(#specs)*
                specs
            }
        }
        #default_impl
    })
}
