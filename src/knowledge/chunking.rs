//! Token-aware chunking: text-splitter cuts at the largest semantic boundary
//! (paragraph, sentence, word) that keeps a chunk within `chunk_tokens` tokens of
//! the embedding model's own tokenizer, with `chunk_overlap` tokens of overlap.

use text_splitter::{ChunkConfig, ChunkSizer, TextSplitter};
use tokenizers::Tokenizer;

/// Counts tokens the way the embedding model will (special tokens excluded).
struct TokenCount(Tokenizer);

impl ChunkSizer for TokenCount {
    fn size(&self, chunk: &str) -> usize {
        // A text the tokenizer cannot read counts by its bytes (an upper bound).
        self.0.encode(chunk, false).map_or(chunk.len(), |e| e.get_ids().len())
    }
}

pub struct Chunker {
    splitter: TextSplitter<TokenCount>,
}

impl Chunker {
    /// `tokenizer_json`: the embedding model's tokenizer.json.
    pub fn load(tokenizer_json: &std::path::Path, tokens: usize, overlap: usize) -> Result<Self, String> {
        let mut tok = Tokenizer::from_file(tokenizer_json).map_err(|e| format!("{}: {e}", tokenizer_json.display()))?;
        tok.with_truncation(None).map_err(|e| e.to_string())?;
        tok.with_padding(None);
        // Leave room for [CLS] and [SEP].
        let config = ChunkConfig::new(tokens.saturating_sub(2).max(8))
            .with_overlap(overlap.min(tokens / 2))
            .map_err(|e| e.to_string())?
            .with_sizer(TokenCount(tok));
        Ok(Chunker {
            splitter: TextSplitter::new(config),
        })
    }

    pub fn split(&self, text: &str) -> Vec<String> {
        self.splitter.chunks(text).map(str::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fit_the_budget_overlap_and_cover_the_text() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2/tokenizer.json");
        if !path.exists() {
            eprintln!("SKIPPED: {} missing; run scripts/fetch-models", path.display());
            return;
        }
        let chunker = Chunker::load(&path, 64, 16).expect("chunker");
        let text = (0..60)
            .map(|i| format!("Sentence number {i} talks about topic {} in some detail.", i % 7))
            .collect::<Vec<_>>()
            .join(" ");
        let chunks = chunker.split(&text);
        assert!(chunks.len() > 3, "{} chunks", chunks.len());
        let mut tok = Tokenizer::from_file(&path).expect("tokenizer");
        tok.with_padding(None);
        for c in &chunks {
            let n = tok.encode(c.as_str(), false).expect("encode").get_ids().len();
            assert!(n <= 62, "chunk of {n} tokens");
        }
        // Every sentence is somewhere, and neighbours share text (the overlap).
        for i in 0..60 {
            assert!(
                chunks.iter().any(|c| c.contains(&format!("number {i} "))),
                "sentence {i} lost"
            );
        }
        assert!(chunks.windows(2).any(|w| {
            let tail = &w[0][w[0].len().saturating_sub(20)..];
            w[1].contains(tail.trim())
        }));
        assert!(chunker.split("").is_empty());
    }
}
