//! Python bindings for nanochat's tokenizer core. Logic lives in the sibling modules;
//! this file only converts between Python and Rust types and releases the GIL around work.
use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::PyBytes;

mod classes;
mod encode;
mod pretokenize;
mod train;

/// Token ids of a batch, flat, and the offset of each text's first id (plus the end).
type FlatIds<'py> = (Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<i64>>);

fn value_error(e: String) -> PyErr {
    PyValueError::new_err(e)
}

/// Split `text` into pre-tokens with a named split pattern ("cl100k"/"gpt4", "o200k",
/// "nanochat") or a regex. engine="regex" forces the regex engine even for a named pattern.
#[pyfunction]
#[pyo3(name = "pretokenize", signature = (text, pattern = "cl100k", engine = "auto"))]
fn py_pretokenize(
    py: Python<'_>,
    text: &str,
    pattern: &str,
    engine: &str,
) -> PyResult<Vec<String>> {
    let splitter = match engine {
        "auto" => pretokenize::Splitter::new(pattern),
        "regex" => pretokenize::Splitter::regex(pattern),
        other => Err(format!("engine must be 'auto' or 'regex', not {other:?}")),
    }
    .map_err(value_error)?;
    py.detach(|| {
        Ok(splitter
            .split(text)?
            .into_iter()
            .map(str::to_owned)
            .collect())
    })
    .map_err(value_error)
}

/// The regex of a named split pattern; any other string is returned as it is.
#[pyfunction]
fn pattern_regex(pattern: &str) -> &str {
    pretokenize::resolve(pattern)
}

/// A BPE encoder: mergeable ranks (token bytes, id), special tokens (string, id), split pattern.
#[pyclass(frozen, module = "nanochat._bpe")]
struct Encoder {
    inner: encode::Encoder,
}

#[pymethods]
impl Encoder {
    #[new]
    fn new(
        py: Python<'_>,
        ranks: Vec<(Bound<'_, PyBytes>, u32)>,
        specials: Vec<(String, u32)>,
        pattern: &str,
    ) -> PyResult<Self> {
        let ranks: Vec<(Vec<u8>, u32)> = ranks
            .iter()
            .map(|(b, r)| (b.as_bytes().to_vec(), *r))
            .collect();
        let inner = py
            .detach(|| encode::Encoder::new(ranks, specials, pattern))
            .map_err(value_error)?;
        Ok(Encoder { inner })
    }

    /// One past the largest token id.
    #[getter]
    fn n_ids(&self) -> usize {
        self.inner.n_ids()
    }

    fn encode_ordinary(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.detach(|| self.inner.encode_ordinary(text))
            .map_err(value_error)
    }

    /// Encode with the special tokens in `allowed` (all of them if None) turned into their ids.
    #[pyo3(signature = (text, allowed = None))]
    fn encode(
        &self,
        py: Python<'_>,
        text: &str,
        allowed: Option<Vec<String>>,
    ) -> PyResult<Vec<u32>> {
        let allowed = self
            .inner
            .allowed(allowed.as_deref())
            .map_err(value_error)?;
        py.detach(|| self.inner.encode(text, &allowed))
            .map_err(value_error)
    }

    /// The first special token of `names` (all if None) that occurs in `text`, if any.
    #[pyo3(signature = (text, names = None))]
    fn find_special(
        &self,
        py: Python<'_>,
        text: &str,
        names: Option<Vec<String>>,
    ) -> PyResult<Option<String>> {
        let which = self.inner.allowed(names.as_deref()).map_err(value_error)?;
        Ok(py.detach(|| self.inner.find_special(text, &which).map(str::to_owned)))
    }

    #[pyo3(signature = (texts, allowed = None, num_threads = None))]
    fn encode_batch(
        &self,
        py: Python<'_>,
        texts: Vec<PyBackedStr>,
        allowed: Option<Vec<String>>,
        num_threads: Option<usize>,
    ) -> PyResult<Vec<Vec<u32>>> {
        let allowed = self
            .inner
            .allowed(allowed.as_deref())
            .map_err(value_error)?;
        py.detach(|| self.inner.encode_batch(&texts, &allowed, num_threads))
            .map_err(value_error)
    }

    /// Encode a batch into (ids: uint32 array, offsets: int64 array of len(texts) + 1).
    #[pyo3(signature = (texts, allowed = None, num_threads = None))]
    fn encode_batch_numpy<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<PyBackedStr>,
        allowed: Option<Vec<String>>,
        num_threads: Option<usize>,
    ) -> PyResult<FlatIds<'py>> {
        let allowed = self
            .inner
            .allowed(allowed.as_deref())
            .map_err(value_error)?;
        let (ids, offsets) = py
            .detach(|| self.inner.encode_batch_flat(&texts, &allowed, num_threads))
            .map_err(value_error)?;
        Ok((ids.into_pyarray(py), offsets.into_pyarray(py)))
    }

    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<u32>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = py
            .detach(|| self.inner.decode_bytes(&ids))
            .map_err(value_error)?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// The bytes of one token id, or None if the id is not in the vocabulary.
    fn token_bytes<'py>(&self, py: Python<'py>, id: u32) -> Option<Bound<'py, PyBytes>> {
        self.inner.token_bytes(id).map(|b| PyBytes::new(py, b))
    }
}

/// Counts pre-token pieces of texts fed in chunks; `trainer()` then starts the merges.
#[pyclass(module = "nanochat._bpe")]
struct PieceCounter {
    inner: Option<train::PieceCounts>,
}

#[pymethods]
impl PieceCounter {
    #[new]
    fn new(pattern: &str) -> PyResult<Self> {
        Ok(PieceCounter {
            inner: Some(train::PieceCounts::new(pattern).map_err(value_error)?),
        })
    }

    fn add(&mut self, py: Python<'_>, texts: Vec<PyBackedStr>) -> PyResult<()> {
        let counts = self
            .inner
            .as_mut()
            .ok_or_else(|| value_error("counter already used".into()))?;
        py.detach(|| counts.add(&texts)).map_err(value_error)
    }

    /// Number of distinct pieces counted so far.
    fn __len__(&self) -> usize {
        self.inner.as_ref().map_or(0, train::PieceCounts::len)
    }

    /// Hand the counts over to a trainer (the counter is empty afterwards).
    fn trainer(&mut self, py: Python<'_>) -> PyResult<Trainer> {
        let counts = self
            .inner
            .take()
            .ok_or_else(|| value_error("counter already used".into()))?;
        Ok(Trainer {
            inner: py.detach(|| train::Trainer::new(counts)),
        })
    }
}

#[pyclass(module = "nanochat._bpe")]
struct Trainer {
    inner: train::Trainer,
}

#[pymethods]
impl Trainer {
    /// Add up to `max_new` tokens; returns how many were added (0 once no pair is left).
    fn step(&mut self, py: Python<'_>, max_new: usize) -> usize {
        let inner = &mut self.inner;
        py.detach(|| inner.step(max_new))
    }

    /// The tokens so far, by id.
    fn vocab<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        self.inner
            .vocab()
            .iter()
            .map(|b| PyBytes::new(py, b))
            .collect()
    }
}

#[pymodule]
fn _bpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(py_pretokenize, m)?)?;
    m.add_function(wrap_pyfunction!(pattern_regex, m)?)?;
    m.add_class::<Encoder>()?;
    m.add_class::<PieceCounter>()?;
    m.add_class::<Trainer>()?;
    m.add(
        "PATTERN_NAMES",
        pretokenize::NAMED_PATTERNS.map(|(n, _)| n).to_vec(),
    )?;
    Ok(())
}
