//! A `tokenizers::Tokenizer` from `tokenizer.ggml.*` metadata (see the module docs).
