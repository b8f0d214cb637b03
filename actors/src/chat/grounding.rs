//! Grounding: which sentences of the sources support an answer, and how much
//! of the answer they support.
//!
//! Pure logic over sentence embeddings (computed by the embedding model the
//! server already runs): the sentences of an answer are matched to the
//! sentences of the sources it was given. A sentence's **support** is its best
//! cosine with a source sentence, times the square of the share of its key
//! terms (numbers, and capitalised words past the first) that appear in that
//! sentence's passage: a sentence that names a year, a number or a name no source has is
//! not supported however close its wording is — the names and numbers must be
//! in the passage of that source sentence, so the right place's name with
//! another place's year is not supported either. A sentence whose key terms not
//! in the question all appear in one source sentence, the rest in its passage
//! ("The answer is 6406." beside "About 6406 puffins nest …") is supported by
//! it: 1. `confidence` is the share of
//! the answer's sentences whose support reaches the threshold, weighted by the
//! retrieval relevance of the best source (docs/ARCHITECTURE.md, "Grounding").

use serde::{Deserialize, Serialize};

/// A sentence of a source that supports the answer: an exact substring of the
/// source's stored text, at `start..end` (in characters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Quote {
    pub text: String,
    /// Offset of the first character in the source's passage text.
    pub start: usize,
    /// Offset after the last character.
    pub end: usize,
    /// How closely it matches the answer (cosine of the embeddings, 0–1).
    pub score: f32,
}

/// A sentence: its byte range in the text it came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn of(self, text: &str) -> &str {
        &text[self.start..self.end]
    }
}

/// Fewer characters than this is not a sentence of its own ("[1]", "No.").
const MIN_SENTENCE_CHARS: usize = 8;

/// The sentences of `text`, at most `max`: cut after `.`, `!`, `?` or `;`
/// followed by white space, and at line breaks; also after `.`, `!` or `?`
/// between a lower-case letter, digit or `)` and a capitalized word with no
/// space ("in infants.A line", "(n = 7).To assess": text from PDFs and corpora
/// such as SciFact joins sentences so); trimmed, the short ones dropped. Byte
/// ranges on char boundaries.
pub fn sentences(text: &str, max: usize) -> Vec<Span> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut prev = ' ';
    let mut chars = text.char_indices().peekable();
    let push = |from: usize, to: usize, out: &mut Vec<Span>| {
        let piece = &text[from..to];
        let lead = piece.len() - piece.trim_start().len();
        let trimmed = piece.trim();
        if trimmed.chars().filter(|c| c.is_alphanumeric()).count() >= MIN_SENTENCE_CHARS {
            out.push(Span {
                start: from + lead,
                end: from + lead + trimmed.len(),
            });
        }
    };
    while let Some((i, c)) = chars.next() {
        if out.len() >= max {
            return out;
        }
        let next_is_space = chars.peek().is_none_or(|(_, n)| n.is_whitespace());
        let joined = || {
            let mut after = text[i + c.len_utf8()..].chars();
            let (a, b) = (after.next(), after.next());
            (prev.is_lowercase() || prev.is_ascii_digit() || prev == ')')
                && a.is_some_and(char::is_uppercase)
                && b.is_none_or(|b| b.is_lowercase() || b.is_whitespace())
        };
        let cut = match c {
            '\n' => true,
            '.' | '!' | '?' | ';' => next_is_space && !abbreviation(&text[start..i]),
            _ => false,
        } || (matches!(c, '.' | '!' | '?') && joined());
        prev = c;
        if cut {
            let end = i + c.len_utf8();
            push(start, end, &mut out);
            start = end;
        }
    }
    if out.len() < max && start < text.len() {
        push(start, text.len(), &mut out);
    }
    out
}

/// A period after "e.g", "Dr" or a single letter ("J. Smith") does not end a
/// sentence.
fn abbreviation(before: &str) -> bool {
    let word = before.rsplit(|c: char| c.is_whitespace()).next().unwrap_or("");
    let w = word.trim_start_matches(|c: char| !c.is_alphanumeric());
    matches!(
        w.to_ascii_lowercase().as_str(),
        "e.g" | "i.e" | "dr" | "mr" | "mrs" | "ms" | "st" | "vs" | "etc" | "fig" | "al"
    ) || (w.chars().count() == 1 && w.chars().all(char::is_alphabetic))
}

/// Words of a sentence that carry a checkable fact: numbers, and capitalised
/// words past the first word. Lower-cased.
pub fn key_terms(sentence: &str) -> Vec<String> {
    let sentence = without_citations(sentence);
    let mut out = Vec::new();
    for (n, word) in sentence
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .filter(|w| !w.is_empty())
        .enumerate()
    {
        let number = word.chars().any(|c| c.is_ascii_digit());
        let name = n > 0 && word.chars().next().is_some_and(char::is_uppercase) && word.chars().count() > 1;
        if number || name {
            out.push(normal(word));
        }
    }
    out.retain(|w| !w.is_empty());
    out.dedup();
    out
}

/// A word as looked up: lower-cased, without quotes or a possessive 's.
fn normal(word: &str) -> String {
    let w = word.trim_matches('\'').to_lowercase();
    match w.strip_suffix("'s") {
        Some(stem) if !stem.is_empty() => stem.to_string(),
        _ => w,
    }
}

/// `text` without citation marks such as "[1]" or "[2, 3]".
fn without_citations(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find(']') {
            Some(close)
                if after[..close]
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == ',' || c == ' ') =>
            {
                out.push(' ');
                rest = &after[close + 1..];
            }
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The lower-cased words of `text`, for `key_terms` lookups.
pub fn vocabulary(text: &str) -> std::collections::HashSet<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(normal)
        .filter(|w| !w.is_empty())
        .collect()
}

/// Numbers written with separators ("12,000") also match without them.
fn known(term: &str, vocab: &std::collections::HashSet<String>) -> bool {
    vocab.contains(term) || vocab.contains(&term.replace([',', '.'], ""))
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    (dot / (na.sqrt() * nb.sqrt())).clamp(-1.0, 1.0)
}

/// One source as grounding sees it: its text, its sentences and their vectors.
pub struct SourceSentences {
    pub text: String,
    pub spans: Vec<Span>,
    pub vectors: Vec<Vec<f32>>,
    /// Calibrated retrieval relevance, 0–1.
    pub relevance: f32,
}

/// How well the sources support the question: its best cosine with a source
/// sentence, times the share of its numbers and names that some source has (a
/// question about a place no source names is not supported by a source about
/// another place, however alike their wording).
pub fn question_support(question: &str, vector: &[f32], sources: &[SourceSentences]) -> f32 {
    let mut vocab = std::collections::HashSet::new();
    for s in sources {
        vocab.extend(vocabulary(&s.text));
    }
    let best = sources
        .iter()
        .flat_map(|s| s.vectors.iter())
        .map(|v| cosine(vector, v))
        .fold(0.0, f32::max);
    best * coverage(question, &vocab)
}

/// The sentences to show the model for a question: the `n` that best match it,
/// as (source, its sentence indices in text order), sources in their order.
/// A sentence's match is its cosine with the question, halved when it has none
/// of the question's names and numbers, and cut to a tenth when its passage
/// has none of them either (a passage about another place: a small model
/// copies what it is shown, the wrong place's number included).
pub fn evidence(question: &str, vector: &[f32], sources: &[SourceSentences], n: usize) -> Vec<(usize, Vec<usize>)> {
    let mut scored = Vec::new();
    for (si, s) in sources.iter().enumerate() {
        let passage = coverage(question, &vocabulary(&s.text));
        for (ki, (span, v)) in s.spans.iter().zip(&s.vectors).enumerate() {
            let own = coverage(question, &vocabulary(span.of(&s.text)));
            let score = cosine(vector, v) * (0.5 + 0.5 * own) * (0.1 + 0.9 * passage);
            scored.push((score, si, ki));
        }
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.truncate(n);
    let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
    for si in 0..sources.len() {
        let mut picked: Vec<usize> = scored.iter().filter(|(_, i, _)| *i == si).map(|(_, _, k)| *k).collect();
        if !picked.is_empty() {
            picked.sort_unstable();
            out.push((si, picked));
        }
    }
    out
}

/// The share of the key terms of `sentence` in `vocab` (1 without key terms).
fn coverage(sentence: &str, vocab: &std::collections::HashSet<String>) -> f32 {
    let terms = key_terms(sentence);
    if terms.is_empty() {
        return 1.0;
    }
    terms.iter().filter(|t| known(t, vocab)).count() as f32 / terms.len() as f32
}

/// What grounding found for one answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Grounded {
    /// Per source (in order), the sentences that support the answer, best first.
    pub quotes: Vec<Vec<Quote>>,
    /// Per answer sentence: its text and support (0–1).
    pub support: Vec<(String, f32)>,
    /// Share of supported sentences, weighted by retrieval relevance.
    pub confidence: f32,
}

impl Grounded {
    /// The answer's sentences below the threshold.
    pub fn unsupported(&self, threshold: f32) -> Vec<&str> {
        self.support
            .iter()
            .filter(|(_, s)| *s < threshold)
            .map(|(t, _)| t.as_str())
            .collect()
    }
}

/// Character offset of byte offset `at` in `text`.
fn char_offset(text: &str, at: usize) -> usize {
    text[..at].chars().count()
}

/// Grounds an answer in its sources. `answer` with its sentence spans and
/// vectors; `threshold`: the support a sentence needs; `max_quotes`: per
/// source. An answer without sentences has confidence 0.
pub fn ground(
    question: &str,
    answer: &str,
    answer_spans: &[Span],
    answer_vectors: &[Vec<f32>],
    sources: &[SourceSentences],
    threshold: f32,
    max_quotes: usize,
) -> Grounded {
    let asked = vocabulary(question);
    // Each passage's words: a sentence's names and numbers must be in the one
    // passage that supports it (the right place's name with another place's
    // year is supported by neither).
    let passages: Vec<std::collections::HashSet<String>> = sources.iter().map(|s| vocabulary(&s.text)).collect();
    // Each source sentence's words, for the sentences that state what one says.
    let words: Vec<Vec<std::collections::HashSet<String>>> = sources
        .iter()
        .map(|s| s.spans.iter().map(|sp| vocabulary(sp.of(&s.text))).collect())
        .collect();
    let mut quotes: Vec<Vec<Quote>> = vec![Vec::new(); sources.len()];
    let mut support = Vec::new();
    for (span, v) in answer_spans.iter().zip(answer_vectors) {
        let sentence = span.of(answer);
        let terms = key_terms(sentence);
        let covered = |si: usize| {
            if terms.is_empty() {
                1.0
            } else {
                terms.iter().filter(|t| known(t, &passages[si])).count() as f32 / terms.len() as f32
            }
        };
        // The best source sentence for this answer sentence: (source, sentence,
        // cosine, support).
        let mut best: Option<(usize, usize, f32, f32)> = None;
        for (si, s) in sources.iter().enumerate() {
            // Squared: one name or number of two missing is not half a support.
            let cov = covered(si).powi(2);
            for (ki, sv) in s.vectors.iter().enumerate() {
                let c = cosine(v, sv).max(0.0);
                if best.is_none_or(|(_, _, _, b)| c * cov > b) {
                    best = Some((si, ki, c, c * cov));
                }
            }
        }
        let mut score = best.map_or(0.0, |(_, _, _, s)| s);
        // What the sentence adds to the question, all in one source sentence,
        // the rest of its names and numbers in that passage.
        let added: Vec<String> = terms.iter().filter(|t| !known(t, &asked)).cloned().collect();
        if !added.is_empty() && score < 1.0 {
            let stating = words.iter().enumerate().find_map(|(si, ws)| {
                if covered(si) < 1.0 {
                    return None;
                }
                ws.iter()
                    .position(|w| added.iter().all(|t| known(t, w)))
                    .map(|ki| (si, ki))
            });
            if let Some((si, ki)) = stating {
                score = 1.0;
                best = Some((si, ki, cosine(v, &sources[si].vectors[ki]).max(0.0), 1.0));
            }
        }
        if let Some((si, ki, c, _)) = best {
            if score >= threshold {
                let s = &sources[si];
                let span = s.spans[ki];
                let list = &mut quotes[si];
                match list.iter_mut().find(|q| q.start == char_offset(&s.text, span.start)) {
                    Some(q) => q.score = q.score.max(c),
                    None => list.push(Quote {
                        text: span.of(&s.text).to_string(),
                        start: char_offset(&s.text, span.start),
                        end: char_offset(&s.text, span.end),
                        score: c,
                    }),
                }
            }
        }
        support.push((sentence.to_string(), score));
    }
    for list in &mut quotes {
        list.sort_by(|a, b| b.score.total_cmp(&a.score));
        list.truncate(max_quotes);
    }
    let supported = support.iter().filter(|(_, s)| *s >= threshold).count();
    let relevance = sources.iter().map(|s| s.relevance.clamp(0.0, 1.0)).fold(0.0, f32::max);
    let confidence = if support.is_empty() {
        0.0
    } else {
        supported as f32 / support.len() as f32 * (0.5 + 0.5 * relevance)
    };
    Grounded {
        quotes,
        support,
        confidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts<'a>(text: &'a str, spans: &[Span]) -> Vec<&'a str> {
        spans.iter().map(|s| s.of(text)).collect()
    }

    #[test]
    fn sentences_cut_at_ends_and_lines_not_at_abbreviations_or_decimals() {
        let t = "The lighthouse was built in 6505. It is 3.5 m tall, e.g. quite small!\nDr. Ovel kept it; \
                 nobody else did?  [1]";
        let s = sentences(t, 10);
        assert_eq!(
            texts(t, &s),
            [
                "The lighthouse was built in 6505.",
                "It is 3.5 m tall, e.g. quite small!",
                "Dr. Ovel kept it;",
                "nobody else did?"
            ]
        );
        assert_eq!(sentences(t, 2).len(), 2);
        assert!(sentences("", 5).is_empty());
        // Sentences joined with no space (SciFact, PDF text); abbreviations and
        // decimals stay whole.
        let j = "Matter develops in infants.A line scan was used (n = 7).To assess e.g. the dose, 2.5 mg was given.";
        assert_eq!(
            texts(j, &sentences(j, 10)),
            [
                "Matter develops in infants.",
                "A line scan was used (n = 7).",
                "To assess e.g. the dose, 2.5 mg was given."
            ]
        );
        // Multi-byte text keeps char boundaries.
        let u = "Ærøskøbing has 900 people. Über alles — ja.";
        assert_eq!(
            texts(u, &sentences(u, 5)),
            ["Ærøskøbing has 900 people.", "Über alles — ja."]
        );
    }

    #[test]
    fn key_terms_are_numbers_and_names_past_the_first_word() {
        assert_eq!(
            key_terms("The lighthouse of Varnholm was completed in 6505 by Ada Kell."),
            ["varnholm", "6505", "ada", "kell"]
        );
        assert!(key_terms("It was finished long ago.").is_empty());
        assert_eq!(key_terms("On Livik there are 2089-puffin nests."), ["livik", "2089"]);
        // Citation marks are not numbers of the answer; a possessive is its name.
        assert_eq!(
            key_terms("It was completed in 6505 [1], by Varnholm's mayor [2, 3]."),
            ["6505", "varnholm"]
        );
    }

    fn source(text: &str, vectors: Vec<Vec<f32>>, relevance: f32) -> SourceSentences {
        let spans = sentences(text, 16);
        assert_eq!(spans.len(), vectors.len());
        SourceSentences {
            text: text.into(),
            spans,
            vectors,
            relevance,
        }
    }

    #[test]
    fn an_answer_is_supported_by_its_closest_sentence_unless_it_names_what_no_source_has() {
        let src = "Varnholm is a town in the north. Its lighthouse was completed in 6505.";
        let sources = [source(src, vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0]], 0.8)];
        let answer = "The lighthouse was completed in 6505. It was completed in 2075.";
        let spans = sentences(answer, 8);
        // Both answer sentences point at the lighthouse sentence.
        let vecs = vec![vec![0.1, 0.99, 0.0], vec![0.1, 0.99, 0.0]];
        // A terse answer whose wording matches nothing, but whose number one
        // source sentence states, is supported by that sentence.
        let terse = "The answer is 6505.";
        let t = ground(
            "When?",
            terse,
            &sentences(terse, 4),
            &[vec![0.0, 0.0, 1.0]],
            &sources,
            0.5,
            3,
        );
        assert_eq!(t.support[0].1, 1.0);
        assert_eq!(t.quotes[0][0].text, "Its lighthouse was completed in 6505.");
        let g = ground("When was it completed?", answer, &spans, &vecs, &sources, 0.5, 3);
        assert!(g.support[0].1 > 0.9, "{:?}", g.support);
        assert_eq!(g.support[1].1, 0.0, "2075 is in no source: {:?}", g.support);
        assert_eq!(g.unsupported(0.5), ["It was completed in 2075."]);
        // One quote, an exact substring at its character offsets.
        assert_eq!(g.quotes[0].len(), 1);
        let q = &g.quotes[0][0];
        assert_eq!(q.text, "Its lighthouse was completed in 6505.");
        let chars: String = src.chars().skip(q.start).take(q.end - q.start).collect();
        assert_eq!(chars, q.text);
        // Half the sentences, weighted by relevance 0.8: 0.5 × 0.9.
        assert!((g.confidence - 0.45).abs() < 1e-6, "{}", g.confidence);
    }

    #[test]
    fn evidence_is_the_best_sentences_of_passages_that_name_what_the_question_names() {
        // Two passages worded alike, about two places; the question names one.
        let a = "Morness is a town. The lighthouse of Morness was completed in 4854.";
        let b = "Telby is a town. The lighthouse of Telby was completed in 7790.";
        let sources = [
            source(a, vec![vec![0.5, 0.5], vec![0.0, 1.0]], 0.9),
            source(b, vec![vec![0.5, 0.5], vec![0.0, 1.0]], 0.8),
        ];
        let q = "When was the lighthouse of Telby completed?";
        assert_eq!(evidence(q, &[0.0, 1.0], &sources, 1), [(1, vec![1])]);
        assert_eq!(evidence(q, &[0.0, 1.0], &sources, 2), [(1, vec![0, 1])]);
        assert_eq!(evidence(q, &[0.0, 1.0], &sources, 3), [(0, vec![1]), (1, vec![0, 1])]);
        assert!(evidence(q, &[0.0, 1.0], &sources, 0).is_empty());
    }

    #[test]
    fn a_name_with_another_passages_number_is_not_supported() {
        let a = "The lighthouse of Morness was completed in 4854.";
        let b = "The lighthouse of Telby was completed in 7790.";
        let sources = [
            source(a, vec![vec![0.0, 1.0]], 0.9),
            source(b, vec![vec![0.0, 1.0]], 0.9),
        ];
        let q = "When was the lighthouse of Telby completed?";
        let mixed = "The lighthouse of Telby was completed in 4854.";
        let g = ground(q, mixed, &sentences(mixed, 4), &[vec![0.0, 1.0]], &sources, 0.5, 3);
        assert!(g.support[0].1 < 0.5, "{:?}", g.support);
        let right = "The lighthouse of Telby was completed in 7790.";
        let g = ground(q, right, &sentences(right, 4), &[vec![0.0, 1.0]], &sources, 0.5, 3);
        assert_eq!(g.support[0].1, 1.0);
        assert!(g.quotes[0].is_empty());
        assert_eq!(g.quotes[1][0].text, b);
        let terse = "It was 4854.";
        let g = ground(q, terse, &sentences(terse, 4), &[vec![1.0, 0.0]], &sources, 0.5, 3);
        assert_eq!(g.support[0].1, 1.0, "what it adds is in one sentence: {:?}", g.support);
    }

    #[test]
    fn offsets_count_characters_and_an_empty_answer_has_no_confidence() {
        let src = "Ærø is small. Its ferry leaves at 9.";
        let sources = [source(src, vec![vec![1.0, 0.0], vec![0.0, 1.0]], 1.0)];
        let answer = "The ferry leaves at 9 each day.";
        let g = ground("", answer, &sentences(answer, 4), &[vec![0.0, 1.0]], &sources, 0.5, 3);
        let q = &g.quotes[0][0];
        assert_eq!((q.start, q.end), (14, 36));
        assert_eq!(
            src.chars().skip(q.start).take(q.end - q.start).collect::<String>(),
            q.text
        );
        assert_eq!(g.confidence, 1.0);
        let empty = ground("", "", &[], &[], &sources, 0.5, 3);
        assert_eq!(empty.confidence, 0.0);
        assert!(empty.quotes[0].is_empty());
        assert_eq!(
            question_support("When does the ferry leave?", &[0.0, 1.0], &sources),
            1.0
        );
        assert_eq!(question_support("When does the ferry leave?", &[0.0, 1.0], &[]), 0.0);
        // A name no source has: half the question's key terms are unknown.
        assert_eq!(
            question_support("When does the Ærø ferry leave for Lund?", &[0.0, 1.0], &sources),
            0.5
        );
    }
}
