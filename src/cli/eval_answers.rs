//! `ragchat eval answers`: can the answers be checked? On a set of invented
//! facts (numbers, names, dates, months that exist nowhere else; one short
//! document per fact, all in one knowledge base), answered by the configured
//! generation model through a server started in this process, twice in the same
//! run: **before** (as answers were made before grounding: no quotes, no
//! refusal, confidence the best relevance, whole passages in the prompt, the
//! repetition penalty over the prompt, no copy bonus), **before + grounding**
//! (the same answers, with quotes, confidence from grounding and refusals:
//! with many invented answers, the set the confidence AUC is measured on) and
//! **after** (the configuration as given). Prints:
//! - fact-in-answer: answerable questions whose answer contains the fact;
//! - quote hit rate: those whose supporting quotes contain the fact;
//! - confidence AUC: how well `confidence` separates the answers that contain
//!   the fact from those that do not (ROC AUC);
//! - refusals on unanswerable questions (facts in no document, about places
//!   that are and that are not in the knowledge base) and on answerable ones;
//! - open questions ("Tell me about …") still answered from sources;
//!
//! then, from the "after" answers, the AUC and refusal rates over a grid of
//! `chat.support_threshold` and `chat.refuse_below` values (calibration).

use std::time::Instant;

use ragchat::auth::PasswordHasher;
use ragchat::config::Settings;
use ragchat::knowledge::calibration::auc;
use ragchat_actors::chat::grounding::{key_terms, sentences};
use serde_json::{json, Value};

use super::bench::common::{bench_user, scratch_dir, scratch_stores, seed_corpus, serve, Served};

#[derive(Debug, Clone, clap::Args)]
pub struct AnswersEval {
    /// Answerable questions (one invented fact and its document each).
    #[arg(long, default_value_t = 40)]
    pub facts: usize,
    /// Questions whose answer is in no document.
    #[arg(long, default_value_t = 20)]
    pub unanswerable: usize,
    /// Open questions about a place of the knowledge base.
    #[arg(long, default_value_t = 10)]
    pub open: usize,
    /// Seed of the invented facts (the same seed, the same set).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Only the configuration as given (no "before" run).
    #[arg(long)]
    pub after_only: bool,
}

/// splitmix64: a small deterministic generator (the set must not change with a
/// crate's version).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

const SYLLABLES: &[&str] = &[
    "var", "nol", "kes", "trum", "bel", "os", "ind", "ark", "mor", "ve", "li", "da", "zen", "quo", "rha", "tel", "ul",
    "sko", "pir", "gan", "eth", "wy", "bran", "cul",
];
const PLACE_ENDS: &[&str] = &[
    "holm", "by", "stad", "mere", "wick", "dal", "ton", "ness", "vik", "aven",
];
const FIRST_NAMES: &[&str] = &[
    "Ada", "Brin", "Corla", "Davor", "Elsin", "Fenna", "Gotlib", "Hallis", "Ivra", "Jorna", "Kestrin", "Lomé", "Marit",
    "Nedda", "Osric", "Perrin",
];
const MONTHS: &[&str] = &[
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const ABOUT_PLACE: &[&str] = &[
    "{P} is a small town on the northern coast.",
    "{P} lies in a green valley between two rivers.",
    "{P} is known for its quiet harbour and its stone houses.",
];
const GENERIC: &[&str] = &[
    "Visitors usually arrive by ferry from the mainland.",
    "The local market sells fish, bread and wool.",
    "Winters there are long and windy, and summers are short.",
    "Most people in the town work in fishing or farming.",
];

/// The kinds of value a fact has.
#[derive(Clone, Copy)]
enum Slot {
    Year,
    Number,
    Person,
    Month,
}

/// Fact templates: the sentence of the document, the question, the value.
const TEMPLATES: &[(&str, &str, Slot)] = &[
    (
        "The lighthouse of {P} was completed in the year {V}.",
        "In which year was the lighthouse of {P} completed?",
        Slot::Year,
    ),
    (
        "About {V} puffins nest on the cliffs of {P}.",
        "How many puffins nest on the cliffs of {P}?",
        Slot::Number,
    ),
    (
        "The head brewer of the {P} brewery is {V}.",
        "Who is the head brewer of the {P} brewery?",
        Slot::Person,
    ),
    (
        "The bridge of {P} is {V} metres long.",
        "How long is the bridge of {P}?",
        Slot::Number,
    ),
    (
        "The {P} lantern festival is held every year in {V}.",
        "In which month is the {P} lantern festival held?",
        Slot::Month,
    ),
    ("The mayor of {P} is {V}.", "Who is the mayor of {P}?", Slot::Person),
    (
        "The {P} observatory was founded by {V}.",
        "Who founded the {P} observatory?",
        Slot::Person,
    ),
    (
        "The {P} academy has {V} students.",
        "How many students does the {P} academy have?",
        Slot::Number,
    ),
    (
        "The old tower of {P} was built in the year {V}.",
        "In which year was the old tower of {P} built?",
        Slot::Year,
    ),
    (
        "The {P} library holds {V} books.",
        "How many books does the {P} library hold?",
        Slot::Number,
    ),
];

#[derive(Clone)]
enum Kind {
    /// The answer must contain this (lower-case).
    Fact(String),
    Unanswerable,
    Open,
}

#[derive(Clone)]
struct Case {
    kind: Kind,
    question: String,
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

fn place(rng: &mut Rng) -> String {
    let mut s = rng.pick(SYLLABLES).to_string();
    if rng.below(2) == 0 {
        s.push_str(rng.pick(SYLLABLES));
    }
    s.push_str(rng.pick(PLACE_ENDS));
    capitalised(&s)
}

/// The documents (BEIR jsonl lines) and the questions.
fn dataset(opts: &AnswersEval) -> (Vec<String>, Vec<Case>) {
    let mut rng = Rng(opts.seed);
    let mut places: Vec<String> = Vec::new();
    while places.len() < opts.facts + opts.unanswerable {
        let p = place(&mut rng);
        if !places.contains(&p) {
            places.push(p);
        }
    }
    let (known, unknown) = places.split_at(opts.facts);
    let mut docs = Vec::new();
    let mut cases = Vec::new();
    let mut template_of = Vec::new();
    for (i, p) in known.iter().enumerate() {
        let t = i % TEMPLATES.len();
        template_of.push(t);
        let (sentence, question, value) = TEMPLATES[t];
        let (shown, fact) = match value {
            Slot::Year => {
                let y = rng.range(1100, 9800).to_string();
                (y.clone(), y)
            }
            Slot::Number => {
                let n = rng.range(130, 48_000).to_string();
                (n.clone(), n)
            }
            Slot::Month => {
                let m = rng.pick(MONTHS);
                (m.to_string(), m.to_lowercase())
            }
            Slot::Person => {
                let first = rng.pick(FIRST_NAMES);
                let last = capitalised(&format!("{}{}", rng.pick(SYLLABLES), rng.pick(SYLLABLES)));
                (format!("{first} {last}"), last.to_lowercase())
            }
        };
        let text = [
            ABOUT_PLACE[rng.below(ABOUT_PLACE.len())].replace("{P}", p),
            GENERIC[rng.below(GENERIC.len())].to_string(),
            sentence.replace("{P}", p).replace("{V}", &shown),
            GENERIC[rng.below(GENERIC.len())].to_string(),
        ]
        .join(" ");
        docs.push(json!({"_id": format!("fact-{i}"), "title": p, "text": text}).to_string());
        cases.push(Case {
            kind: Kind::Fact(fact),
            question: question.replace("{P}", p),
        });
    }
    // Unanswerable: half about places of the knowledge base, asking what their
    // document does not say; half about places it does not have.
    for (i, other) in unknown.iter().enumerate() {
        let (p, t) = if i % 2 == 0 && !known.is_empty() {
            let k = rng.below(known.len());
            (
                known[k].as_str(),
                (template_of[k] + 1 + rng.below(TEMPLATES.len() - 1)) % TEMPLATES.len(),
            )
        } else {
            (other.as_str(), rng.below(TEMPLATES.len()))
        };
        cases.push(Case {
            kind: Kind::Unanswerable,
            question: TEMPLATES[t].1.replace("{P}", p),
        });
    }
    for i in 0..opts.open.min(known.len()) {
        let p = &known[(i * 7) % known.len()];
        let q = if i % 2 == 0 {
            format!("Tell me about {p}.")
        } else {
            format!("What is {p} known for?")
        };
        cases.push(Case {
            kind: Kind::Open,
            question: q,
        });
    }
    (docs, cases)
}

/// What came back for one question.
struct Answered {
    answer: String,
    confidence: f32,
    refused: bool,
    cited: bool,
    quotes: Vec<String>,
    /// Per answer sentence (after grounding).
    support: Vec<f32>,
    question_support: Option<f32>,
    relevance: f32,
    ms: f64,
}

/// Lower case, and numbers without separators ("12,400" → "12400").
fn normalise(text: &str) -> String {
    let lower = text.to_lowercase();
    let chars: Vec<char> = lower.chars().collect();
    let mut out = String::with_capacity(lower.len());
    for (i, c) in chars.iter().enumerate() {
        let between_digits = (*c == ',' || *c == '\u{a0}')
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if !between_digits {
            out.push(*c);
        }
    }
    out
}

/// Seeds the documents, then asks every question (greedy answers) through a
/// server started with `settings`.
async fn answer_all(
    settings: Settings,
    docs: &[String],
    cases: &[Case],
    max_tokens: usize,
) -> anyhow::Result<Vec<Answered>> {
    let dir = scratch_dir()?;
    let mut settings = settings;
    scratch_stores(&mut settings, &dir);
    settings.rate_limits.chat.limit = 1_000_000;
    settings.chat.temperature = 0.0;
    let Served { state, port, handle } = serve(settings.clone()).await?;
    anyhow::ensure!(state.generator.is_some(), "the generation model is not loaded");
    let corpus = dir.join("facts.jsonl");
    std::fs::write(&corpus, docs.join("\n"))?;
    let (created, _) = seed_corpus(&state, &settings, &corpus).await?;
    anyhow::ensure!(created == docs.len(), "seeded {created} of {} documents", docs.len());
    let hasher = PasswordHasher::new(settings.auth.argon2)?;
    let token = bench_user(
        &state,
        &hasher,
        "eval-answers@example.com",
        ragchat_actors::plans::Plan::Enterprise,
    )
    .await?;
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    for case in cases {
        let t = Instant::now();
        let r: Value = client
            .post(format!("http://127.0.0.1:{port}/chat/message"))
            .bearer_auth(&token)
            .json(&json!({"message": case.question, "max_tokens": max_tokens, "debug_mode": true}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let sources = r["sources"].as_array().cloned().unwrap_or_default();
        let grounding = &r["debug_info"]["grounding"];
        out.push(Answered {
            answer: r["answer"].as_str().unwrap_or("").to_string(),
            confidence: r["confidence"].as_f64().unwrap_or(0.0) as f32,
            refused: r["response_type"] == "not_in_knowledge_base",
            cited: r["context_used"] == true,
            quotes: sources
                .iter()
                .flat_map(|s| s["quotes"].as_array().cloned().unwrap_or_default())
                .filter_map(|q| q["text"].as_str().map(str::to_string))
                .collect(),
            support: grounding["support"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_f64().map(|f| f as f32)).collect())
                .unwrap_or_default(),
            question_support: grounding["question_support"].as_f64().map(|f| f as f32),
            relevance: sources
                .iter()
                .filter_map(|s| s["relevance_score"].as_f64())
                .fold(0.0, f64::max) as f32,
            ms: t.elapsed().as_secs_f64() * 1000.0,
        });
    }
    handle.stop(true).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

/// The figures of one run.
fn report(label: &str, cases: &[Case], answered: &[Answered]) {
    let pct = |n: usize, of: usize| if of == 0 { 0.0 } else { 100.0 * n as f64 / of as f64 };
    let (mut facts, mut in_answer, mut in_quote, mut refused_answerable) = (0, 0, 0, 0);
    let mut scored = Vec::new();
    let (mut unanswerable, mut refused) = (0, 0);
    let (mut open, mut open_cited) = (0, 0);
    for (case, a) in cases.iter().zip(answered) {
        match &case.kind {
            Kind::Fact(fact) => {
                facts += 1;
                let hit = normalise(&a.answer).contains(fact.as_str());
                in_answer += usize::from(hit);
                in_quote += usize::from(a.quotes.iter().any(|q| normalise(q).contains(fact.as_str())));
                refused_answerable += usize::from(a.refused);
                if !a.refused {
                    scored.push((a.confidence, hit));
                }
            }
            Kind::Unanswerable => {
                unanswerable += 1;
                refused += usize::from(a.refused);
            }
            Kind::Open => {
                open += 1;
                open_cited += usize::from(a.cited && !a.refused);
            }
        }
    }
    let mean_ms = answered.iter().map(|a| a.ms).sum::<f64>() / answered.len().max(1) as f64;
    println!(
        "{label:<22} {:>6.1}% ({in_answer}/{facts})  {:>6.1}% ({in_quote}/{facts})  {:>6.3}  {:>6.1}% ({refused}/{unanswerable})  \
         {:>6.1}% ({refused_answerable}/{facts})  {:>6.1}% ({open_cited}/{open})  {mean_ms:>7.0}",
        pct(in_answer, facts),
        pct(in_quote, facts),
        auc(&scored),
        pct(refused, unanswerable),
        pct(refused_answerable, facts),
        pct(open_cited, open),
    );
}

/// From grounded answers: confidence AUC at other support thresholds, and
/// the refusal rates at other question-support thresholds.
fn calibration(label: &str, cases: &[Case], answered: &[Answered]) {
    println!("\ncalibration (from the answers of \"{label}\", no new generation):");
    println!(
        "  support_threshold  confidence AUC (fact in answer vs not): all sentences (as served) / \
         sentences with numbers or names only / the first sentence only"
    );
    for t in (30..=80).step_by(5).map(|t| t as f32 / 100.0) {
        let mut variants: [Vec<(f32, bool)>; 3] = Default::default();
        for (c, a) in cases.iter().zip(answered) {
            let Kind::Fact(fact) = &c.kind else { continue };
            if a.refused || a.support.is_empty() {
                continue;
            }
            let hit = normalise(&a.answer).contains(fact.as_str());
            let weight = 0.5 + 0.5 * a.relevance;
            let share = |s: &[f32]| s.iter().filter(|x| **x >= t).count() as f32 / s.len().max(1) as f32;
            let spans = sentences(&a.answer, a.support.len());
            let factual: Vec<f32> = spans
                .iter()
                .zip(&a.support)
                .filter(|(sp, _)| !key_terms(sp.of(&a.answer)).is_empty())
                .map(|(_, s)| *s)
                .collect();
            variants[0].push((share(&a.support) * weight, hit));
            let f = if factual.is_empty() {
                &a.support[..]
            } else {
                &factual[..]
            };
            variants[1].push((share(f) * weight, hit));
            variants[2].push((share(&a.support[..1]) * weight, hit));
        }
        println!(
            "  {t:>17.2}  {:.3} / {:.3} / {:.3} ({} answers)",
            auc(&variants[0]),
            auc(&variants[1]),
            auc(&variants[2]),
            variants[0].len()
        );
    }
    let mut q: Vec<(f32, bool)> = Vec::new();
    for (c, a) in cases.iter().zip(answered) {
        if let Some(s) = a.question_support {
            match c.kind {
                Kind::Fact(_) | Kind::Open => q.push((s, true)),
                Kind::Unanswerable => q.push((s, false)),
            }
        }
    }
    println!(
        "  question support: AUC {:.3} (answerable and open vs unanswerable, {} questions)",
        auc(&q),
        q.len()
    );
    println!("  refuse_below  refused unanswerable  refused answerable or open");
    for t in (10..=70).step_by(5).map(|t| t as f32 / 100.0) {
        let (un, un_r) = q
            .iter()
            .filter(|(_, ok)| !ok)
            .fold((0, 0), |(n, r), (s, _)| (n + 1, r + usize::from(*s < t)));
        let (an, an_r) = q
            .iter()
            .filter(|(_, ok)| *ok)
            .fold((0, 0), |(n, r), (s, _)| (n + 1, r + usize::from(*s < t)));
        println!("  {t:>12.2}  {un_r:>9}/{un:<10}  {an_r:>9}/{an}");
    }
}

pub async fn run(settings: Settings, opts: AnswersEval) -> anyhow::Result<()> {
    let (docs, cases) = dataset(&opts);
    println!(
        "answers: {} invented facts (one document each), {} unanswerable and {} open questions; model {}, greedy, \
         max_tokens {}",
        opts.facts, opts.unanswerable, opts.open, settings.models.generator_name, opts.max_tokens
    );
    let mut runs = Vec::new();
    if !opts.after_only {
        // The answers as they were made before: whole passages, the repetition
        // penalty over the prompt, no copy bonus…
        let mut old = settings.clone();
        old.chat.evidence_sentences = 0;
        old.chat.copy_bonus = 0.0;
        old.chat.penalize_prompt = true;
        // … without grounding (confidence: the best relevance), and with it
        // (many answers invent: the labelled set for the confidence AUC).
        let mut before = old.clone();
        before.chat.grounding_sentences = 0;
        before.chat.refuse_below = 0.0;
        runs.push(("before", before));
        runs.push(("before + grounding", old));
    }
    runs.push(("after (as configured)", settings.clone()));
    let mut results = Vec::new();
    for (label, s) in runs {
        results.push((label, answer_all(s, &docs, &cases, opts.max_tokens).await?));
    }
    println!(
        "\n{:<22} {:>18}  {:>18}  {:>6}  {:>16}  {:>16}  {:>14}  {:>7}",
        "run", "fact in answer", "quote has fact", "AUC", "refused unansw.", "refused answ.", "open cited", "ms/q"
    );
    for (label, answered) in &results {
        report(label, &cases, answered);
    }
    // Calibrate on the grounded run with the most invented answers.
    if let Some((label, answered)) = results
        .iter()
        .rev()
        .find(|(l, _)| *l == "before + grounding")
        .or(results.last())
    {
        calibration(label, &cases, answered);
    }
    if let Some((_, answered)) = results.last() {
        println!("\nanswers of the last run (question → answer, confidence):");
        for (c, a) in cases.iter().zip(answered).take(12) {
            println!(
                "  {} → {} ({:.2})",
                c.question,
                a.answer.replace('\n', " "),
                a.confidence
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_is_the_same_for_a_seed_and_each_fact_is_in_its_document() {
        let opts = AnswersEval {
            facts: 20,
            unanswerable: 10,
            open: 4,
            seed: 3,
            max_tokens: 8,
            after_only: true,
        };
        let (docs, cases) = dataset(&opts);
        let (again, _) = dataset(&opts);
        assert_eq!(docs, again);
        assert_eq!(docs.len(), 20);
        assert_eq!(cases.len(), 34);
        for (i, c) in cases.iter().take(20).enumerate() {
            let Kind::Fact(fact) = &c.kind else {
                panic!("case {i} is not a fact")
            };
            let holding: Vec<usize> = (0..docs.len())
                .filter(|d| normalise(&docs[*d]).contains(fact.as_str()))
                .collect();
            assert!(holding.contains(&i), "{fact} not in its document {}", docs[i]);
        }
        assert_eq!(normalise("About 12,400 Puffins"), "about 12400 puffins");
    }
}
