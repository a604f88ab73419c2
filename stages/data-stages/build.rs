//! Writes the digests of the code this crate's stage kinds are built from (see `dag-code`).

fn main() {
    if let Err(e) = dag_code::write_build_constants() {
        panic!("cannot take the code digests of dag-data-stages: {e}");
    }
}
