//! The model: config, checkpoint reading, rotary tables and the decoder (one forward pass,
//! generic over the compute backend).

pub mod checkpoint;
pub mod config;
pub mod decoder;
/// Fuzz targets of the Hugging Face folder loaders (the fuzz_model_files example and bounded tests).
#[doc(hidden)]
pub mod fuzz;
pub mod gguf_model;
#[cfg(test)]
mod loader_tests;
pub mod rope;
pub mod scheme;
pub mod tokenizer_file;
