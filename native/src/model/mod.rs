//! Model definition: config, checkpoint loading, weights and the LLaMA-family forward pass.

pub mod config;
pub mod llama;
pub mod loader;
pub mod weights;
