//! The `weights=` option: one format for every matrix, or `q4_k_m`, llama.cpp's mix (Q4_K,
//! with Q6_K for the output matrix and for the V projection and FFN down projection of the
//! layers that `more_bits` picks).

use crate::tensor::WeightFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightScheme {
    Uniform(WeightFormat),
    Q4KM,
    /// Every matrix as the file stores it (GGUF files: their block formats, used in place).
    Stored,
}

impl WeightScheme {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "q4_k_m" => Some(WeightScheme::Q4KM),
            "stored" => Some(WeightScheme::Stored),
            _ => WeightFormat::parse(name).map(WeightScheme::Uniform),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightScheme::Uniform(f) => f.name(),
            WeightScheme::Q4KM => "q4_k_m",
            WeightScheme::Stored => "stored",
        }
    }

    /// The format for the checkpoint matrix `name` (Hugging Face names) of a model with
    /// `layers` layers; `tied`: the embedding is also the output matrix; `stored`: the
    /// format the file stores it in.
    pub fn format_for(self, name: &str, layers: usize, tied: bool, stored: WeightFormat) -> WeightFormat {
        match self {
            WeightScheme::Uniform(f) => return f,
            WeightScheme::Stored => return stored,
            WeightScheme::Q4KM => {}
        }
        let layer = name.strip_prefix("model.layers.").and_then(|rest| rest.split('.').next()).and_then(|i| i.parse::<usize>().ok());
        let output = name == "lm_head.weight" || (tied && name == "model.embed_tokens.weight");
        let more_bits = |i: usize| i < layers / 8 || i >= 7 * layers / 8 || (i as isize - (layers / 8) as isize) % 3 == 2;
        let wide = output || matches!(layer, Some(i) if more_bits(i) && (name.ends_with(".self_attn.v_proj.weight") || name.ends_with(".mlp.down_proj.weight")));
        if wide {
            WeightFormat::Q6K
        } else {
            WeightFormat::Q4K
        }
    }

    /// The format the matrix `name` of `cols`-long rows is held in: `format_for`'s, or f16
    /// when its rows are not whole blocks of that format (as llama.cpp falls back); the bool
    /// says whether it fell back. The engine's loader and `upg-batch quantize` both ask here.
    pub fn held_format(self, name: &str, layers: usize, tied: bool, stored: WeightFormat, cols: usize) -> (WeightFormat, bool) {
        let format = self.format_for(name, layers, tied, stored);
        if format.fits_row(cols) {
            (format, false)
        } else {
            (WeightFormat::F16, true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_widens_what_llama_cpp_widens() {
        let s = WeightScheme::Q4KM;
        // 22 layers (TinyLlama): more_bits picks 0, 1, 4, 7, 10, 13, 16, 19, 20, 21.
        let wide: Vec<usize> = (0..22).filter(|i| s.format_for(&format!("model.layers.{i}.mlp.down_proj.weight"), 22, false, WeightFormat::F16) == WeightFormat::Q6K).collect();
        assert_eq!(wide, [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]);
        assert_eq!(s.format_for("model.layers.4.self_attn.v_proj.weight", 22, false, WeightFormat::F16), WeightFormat::Q6K);
        assert_eq!(s.format_for("model.layers.4.self_attn.k_proj.weight", 22, false, WeightFormat::F16), WeightFormat::Q4K);
        assert_eq!(s.format_for("model.layers.5.self_attn.v_proj.weight", 22, false, WeightFormat::F16), WeightFormat::Q4K);
        assert_eq!(s.format_for("lm_head.weight", 22, false, WeightFormat::F16), WeightFormat::Q6K);
        assert_eq!(s.format_for("model.embed_tokens.weight", 22, false, WeightFormat::F16), WeightFormat::Q4K);
        assert_eq!(s.format_for("model.embed_tokens.weight", 22, true, WeightFormat::F16), WeightFormat::Q6K);
        assert_eq!(WeightScheme::parse("q8_0"), Some(WeightScheme::Uniform(WeightFormat::Q8_0)));
        assert_eq!(WeightScheme::parse("q4_k_m").map(|s| s.name()), Some("q4_k_m"));
        assert_eq!(s.held_format("lm_head.weight", 22, false, WeightFormat::F32, 64), (WeightFormat::F16, true));
        assert_eq!(s.held_format("lm_head.weight", 22, false, WeightFormat::F32, 512), (WeightFormat::Q6K, false));
    }
}
