//! The GGUF container: header, metadata, tensor directory (see the module docs).
