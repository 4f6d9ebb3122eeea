//! Python bindings for nanochat's tokenizer core. Logic lives in the sibling modules;
//! this file only converts between Python and Rust types.
use pyo3::prelude::*;

mod pretokenize;

/// Split `text` into pre-tokens with the named split pattern ("cl100k"/"gpt4") or regex.
#[pyfunction]
#[pyo3(name = "pretokenize", signature = (text, pattern = "cl100k"))]
fn py_pretokenize(py: Python<'_>, text: &str, pattern: &str) -> PyResult<Vec<String>> {
    let splitter = pretokenize::Splitter::by_name(pattern)
        .map_err(pyo3::exceptions::PyValueError::new_err)?;
    Ok(py.detach(|| splitter.split(text).map(str::to_owned).collect()))
}

#[pymodule]
fn _bpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_pretokenize, m)?)?;
    Ok(())
}
