//! The model: config, checkpoint reading, rotary tables and the decoder (one forward pass,
//! generic over the compute backend).

pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod gguf_model;
#[cfg(test)]
mod loader_tests;
pub mod rope;
pub mod scheme;
