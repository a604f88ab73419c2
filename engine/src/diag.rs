//! Errors about a pipeline file (or a `-S` override), each with the file, line, column, a source
//! snippet and a hint, rendered by miette at the CLI.

use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceSpan};

use crate::yaml::Span;

/// A text the engine read and may point into: the pipeline file or one `-S` argument.
#[derive(Debug, Clone)]
pub struct Source {
    /// How to name it in messages (the path as given, or `-S train.iters=3`).
    pub name: String,
    /// The full text.
    pub text: Arc<str>,
}

impl Source {
    /// Wraps a text under a display name.
    pub fn new(name: impl Into<String>, text: impl Into<Arc<str>>) -> Self {
        Self {
            name: name.into(),
            text: text.into(),
        }
    }

    fn byte_span(&self, span: Span) -> SourceSpan {
        // The YAML parser counts chars; miette wants bytes.
        let mut it = self.text.char_indices().skip(span.index);
        let start = it.next().map(|(b, _)| b).unwrap_or(self.text.len());
        let end = self
            .text
            .char_indices()
            .nth(span.index + span.len)
            .map(|(b, _)| b)
            .unwrap_or(self.text.len());
        SourceSpan::new(start.into(), end.saturating_sub(start))
    }
}

/// One problem in a pipeline file, attributed to a position.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}:{}:{}: {message}", src.name, span.line, span.col)]
pub struct SpecError {
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
    /// Where.
    pub span: Span,
    /// The text the span points into.
    pub src: Source,
}

impl SpecError {
    /// An error at `span` of `source`.
    pub fn new(source: &Source, span: Span, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: None,
            span,
            src: source.clone(),
        }
    }

    /// Adds what to do about it.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds a hint only when there is one.
    pub fn maybe_hint(mut self, hint: Option<String>) -> Self {
        if hint.is_some() {
            self.hint = hint;
        }
        self
    }

    /// The miette report (snippet, label, help) for printing.
    pub fn report(&self) -> miette::Report {
        let span = self.src.byte_span(self.span);
        // miette's graphical handler panics on some very long lines (a 200 kB key), and such a
        // snippet would not help anyway: past this length the message, which already carries
        // the line and column, stands alone.
        let text = &self.src.text;
        let start = text[..span.offset()].rfind('\n').map_or(0, |i| i + 1);
        let end = text[span.offset()..]
            .find('\n')
            .map_or(text.len(), |i| span.offset() + i);
        let src = (end - start <= MAX_SNIPPET_LINE)
            .then(|| NamedSource::new(self.src.name.clone(), text.to_string()));
        miette::Report::new(Rendered {
            message: self.to_string(),
            hint: self.hint.clone(),
            src,
            span,
        })
    }
}

/// Longest source line (bytes) shown as a snippet under an error.
const MAX_SNIPPET_LINE: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Rendered {
    message: String,
    hint: Option<String>,
    src: Option<NamedSource<String>>,
    span: SourceSpan,
}

impl Diagnostic for Rendered {
    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.hint
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn std::fmt::Display>)
    }
    fn source_code(&self) -> Option<&dyn miette::SourceCode> {
        self.src.as_ref().map(|s| s as &dyn miette::SourceCode)
    }
    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        self.src.as_ref()?;
        Some(Box::new(std::iter::once(LabeledSpan::new_with_span(
            Some("here".into()),
            self.span,
        ))))
    }
}

/// Every problem found in one pass over a pipeline; the engine reports them all at once.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", render_plain(.0))]
pub struct SpecErrors(pub Vec<SpecError>);

fn render_plain(errs: &[SpecError]) -> String {
    errs.iter()
        .map(|e| match &e.hint {
            Some(h) => format!("{e}\n  hint: {h}"),
            None => e.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// "did you mean `x`?" for the closest candidate, if any is close enough.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    closest(word, candidates).map(|c| format!("did you mean `{c}`?"))
}

/// The candidate closest to `word` by Jaro-Winkler similarity, if similar enough to be a typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(s, _)| *s >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_pick_close_names_only() {
        assert_eq!(
            closest("trian_source", ["train_source", "adapt", "evaluate"]),
            Some("train_source")
        );
        assert_eq!(closest("zzz", ["train_source", "adapt"]), None);
    }

    #[test]
    fn byte_spans_handle_multibyte_text() {
        let s = Source::new("p.yaml", "é: 1\nname: x\n");
        let sp = s.byte_span(Span {
            index: 5,
            len: 4,
            line: 2,
            col: 1,
        });
        assert_eq!(sp.offset(), 6);
        assert_eq!(sp.len(), 4);
    }
}
