//! `ragchat bench models`: embedding and generation throughput and time to first
//! token, beside llama.cpp (measured now when it is built) and reference figures.

use std::time::{Duration, Instant};

use ragchat::config::Settings;

use super::common::ms;

/// What `ragchat bench models` measures.
pub struct Options {
    /// Seconds per embedding measurement.
    pub seconds: f64,
    /// BEIR corpus.jsonl whose abstracts are the passages.
    pub passages: std::path::PathBuf,
    /// Stop after the embeddings.
    pub embeddings_only: bool,
}

/// The first `n` texts of a BEIR corpus.jsonl ("title" and "text" per line; the
/// text alone is embedded); empty when the file cannot be read.
fn scifact_passages(path: &std::path::Path, n: usize) -> Vec<String> {
    let Ok(data) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    data.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_string))
        .filter(|t| !t.trim().is_empty())
        .take(n)
        .collect()
}

/// sentence-transformers on the same model directory
/// (scripts/st_bench.py, in the environment scripts/setup-sentence-transformers
/// makes: `ST_VENV`, default ~/.cache/ragchat-st-venv), one process for the
/// whole comparison.
struct SentenceTransformers {
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: std::io::BufReader<std::process::ChildStdout>,
    version: String,
}

impl SentenceTransformers {
    /// Starts it and waits for the model to load; why not, when it cannot.
    fn start(model_dir: &str, threads: usize, max_tokens: usize) -> Result<Self, String> {
        let venv = std::env::var("ST_VENV")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|_| {
                std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/ragchat-st-venv")
            });
        let python = venv.join("bin/python");
        if !python.exists() {
            return Err(format!(
                "no environment at {}: run scripts/setup-sentence-transformers",
                venv.display()
            ));
        }
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/st_bench.py");
        let mut child = std::process::Command::new(&python)
            .arg(&script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", python.display()))?;
        let (Some(input), Some(output)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("no pipes to scripts/st_bench.py".into());
        };
        let mut st = SentenceTransformers {
            child,
            input,
            output: std::io::BufReader::new(output),
            version: String::new(),
        };
        let hello =
            st.ask(&serde_json::json!({"model_dir": model_dir, "threads": threads, "max_tokens": max_tokens}))?;
        st.version = hello["version"].as_str().unwrap_or("?").to_string();
        Ok(st)
    }

    fn ask(&mut self, request: &serde_json::Value) -> Result<serde_json::Value, String> {
        use std::io::{BufRead, Write};
        writeln!(self.input, "{request}").map_err(|e| format!("scripts/st_bench.py: {e}"))?;
        let mut line = String::new();
        self.output
            .read_line(&mut line)
            .map_err(|e| format!("scripts/st_bench.py: {e}"))?;
        serde_json::from_str(&line).map_err(|_| "scripts/st_bench.py stopped (run it by hand to see why)".to_string())
    }

    /// Texts per second at `batch`, cycling through `texts`.
    fn rate(&mut self, texts: &[String], batch: usize, seconds: f64) -> Option<f64> {
        self.ask(&serde_json::json!({"texts": texts, "batch": batch, "seconds": seconds}))
            .ok()
            .and_then(|v| v["rate"].as_f64())
    }
}

impl Drop for SentenceTransformers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sentences of about 45 tokens for the embedding benchmark.
fn sentences(n: usize) -> Vec<String> {
    let base = [
        "Recent studies of the human gut microbiome suggest that dietary fiber intake changes the composition of bacterial communities within weeks",
        "The committee reviewed the proposal for the new railway line and asked the engineers to estimate the cost of the tunnel under the river",
        "Patients who received the combined therapy showed a lower rate of hospital readmission than those treated with the standard drug alone",
        "Volunteers planted more than three thousand trees along the northern edge of the park to reduce noise from the nearby highway traffic",
    ];
    (0..n)
        .map(|i| {
            format!(
                "{}, according to a report published last spring by the regional authority ({i}).",
                base[i % base.len()]
            )
        })
        .collect()
}

/// `ragchat bench models`: embeddings (sentences/s at batch 1, 8, 32) and
/// generation (prefill and decode tokens/s, aggregate decode with 8 streams, time to
/// first token with a 1,000-token prompt at 1 and 8 concurrent requests), beside
/// sentence-transformers and llama.cpp run in the same run where they are installed
/// (scripts/setup-sentence-transformers, scripts/build-llama-cpp).
pub async fn run(settings: Settings, opts: Options) -> anyhow::Result<String> {
    let seconds = opts.seconds;
    use ragchat_actors::embed_worker::{EmbedConfig, EmbedWorker, Lane};
    use ragchat_actors::generate_worker::{GenEvent, GenerateConfig, GenerateRequest, GenerateWorker};
    use ragchat_actors::inference::{Embedder, SamplingParams};

    let m = &settings.models;
    let mut out = String::new();
    // Lines are printed as they are measured (the whole run takes minutes).
    fn emit(out: &mut String, line: String) {
        print!("{line}");
        out.push_str(&line);
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    emit(
        &mut out,
        format!(
            "machine: {threads} threads; models from {} and {}\n",
            m.embedding_dir, m.generator_path
        ),
    );

    // Embeddings, straight on the model (batch sizes exact), beside
    // sentence-transformers on the same texts in the same run, then through the worker.
    let mut bert =
        ragchat::inference::bert::BertEmbedder::load(std::path::Path::new(&m.embedding_dir), m.embedding_max_tokens)?;
    let texts = sentences(256);
    let tokens = bert.count_tokens(&texts[0])?;
    let passages = scifact_passages(&opts.passages, 128);
    // Each measurement of ours is followed by theirs on the same texts, so a
    // change of the machine's speed during the run touches both alike.
    let mut st = SentenceTransformers::start(&m.embedding_dir, threads, m.embedding_max_tokens);
    let mut theirs = |texts: &[String], batch: usize| -> Option<f64> {
        st.as_mut().ok().and_then(|st| st.rate(texts, batch, seconds))
    };
    let cells = |ours: f64, theirs: Option<f64>| -> (String, String) {
        match theirs {
            Some(t) => (format!("{t:.1}"), format!("{:.2}×", ours / t)),
            None => ("not measured".to_string(), String::new()),
        }
    };
    emit(
        &mut out,
        format!(
            "\nembeddings (all-MiniLM-L6-v2, {tokens}-token sentences)   ragchat   sentence-transformers (now)   ratio\n"
        ),
    );
    let rate_of = |bert: &mut ragchat::inference::bert::BertEmbedder, texts: &[String], batch: usize| {
        let refs = |i: usize| -> Vec<&str> { (0..batch).map(|j| texts[(i + j) % texts.len()].as_str()).collect() };
        bert.embed(&refs(0))?; // warm-up, as on their side
        let mut done = 0usize;
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < seconds {
            bert.embed(&refs(done))?;
            done += batch;
        }
        anyhow::Ok(done as f64 / started.elapsed().as_secs_f64())
    };
    for batch in [1usize, 8, 32] {
        let rate = rate_of(&mut bert, &texts[..128], batch)?;
        let (their, ratio) = cells(rate, theirs(&texts[..128], batch));
        emit(
            &mut out,
            format!("  batch {batch:>2}: sentences/s                        {rate:>8.1}   {their:>12}                  {ratio}\n"),
        );
    }
    if passages.is_empty() {
        emit(
            &mut out,
            format!(
                "  passages: not measured (no SciFact corpus at {})\n",
                opts.passages.display()
            ),
        );
    } else {
        let rate = rate_of(&mut bert, &passages, 32)?;
        let (their, ratio) = cells(rate, theirs(&passages, 32));
        emit(
            &mut out,
            format!(
                "  batch 32: SciFact abstracts/s (≤ {} tokens)    {rate:>8.1}   {their:>12}                  {ratio}\n",
                m.embedding_max_tokens
            ),
        );
    }
    match &st {
        Ok(st) => emit(
            &mut out,
            format!("  sentence-transformers: {}, {threads} threads\n", st.version),
        ),
        Err(why) => emit(&mut out, format!("  sentence-transformers: not measured ({why})\n")),
    }
    drop(st);
    drop(bert);
    let worker = EmbedWorker::start(
        {
            let dir = std::path::PathBuf::from(&m.embedding_dir);
            let max = m.embedding_max_tokens;
            Box::new(move || {
                ragchat::inference::bert::BertEmbedder::load(&dir, max).map(|e| Box::new(e) as Box<dyn Embedder>)
            })
        },
        EmbedConfig {
            queue_capacity: 1024,
            ..ragchat::models::embed_config(m)
        },
    )?;
    // One query at a time, as a search embeds its query with nothing else waiting.
    let mut latencies = Vec::new();
    for t in texts.iter().take(100) {
        let started = Instant::now();
        worker.embed(Lane::Interactive, vec![t.clone()]).await?;
        latencies.push(ms(started.elapsed()));
    }
    latencies.sort_by(f64::total_cmp);
    emit(
        &mut out,
        format!(
            "  one query through EmbedWorker, no load: p50 {:.1} ms, p99 {:.1} ms (100 in turn)\n",
            latencies[49], latencies[98]
        ),
    );
    let started = Instant::now();
    let calls = texts
        .iter()
        .take(128)
        .map(|t| worker.embed(Lane::Interactive, vec![t.clone()]));
    futures_util::future::join_all(calls).await;
    let rate = 128.0 / started.elapsed().as_secs_f64();
    let batches = worker.stats.batches.load(std::sync::atomic::Ordering::Relaxed) - 100;
    emit(&mut out, format!("  128 concurrent single-sentence requests through EmbedWorker: {rate:.1} sentences/s in {batches} forwards\n"));
    if opts.embeddings_only {
        return Ok(out);
    }

    // Generation.
    let (lm, tok) = ragchat::inference::gguf::load(
        std::path::Path::new(&m.generator_path),
        None,
        m.max_context,
        m.dense_prefill,
    )?;
    let filler = "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the field. ";
    let mut prompt_text = String::new();
    while tok.encode(&prompt_text)?.len() < 1000 {
        prompt_text.push_str(filler);
    }
    let mut long_prompt = tok.encode(&prompt_text)?;
    long_prompt.truncate(1000);
    let short: Vec<u32> = long_prompt[..256].to_vec();

    let mut seq = lm.fork();
    let started = Instant::now();
    seq.forward(&short, 0)?;
    let prefill = short.len() as f64 / started.elapsed().as_secs_f64();
    let decode_n = 64;
    let started = Instant::now();
    for pos in short.len()..short.len() + decode_n {
        seq.forward(&[short[pos % short.len()]], pos)?;
    }
    let decode_after_prompt = decode_n as f64 / started.elapsed().as_secs_f64();
    // As llama-bench's tg64: 64 tokens from an empty context.
    let mut seq = lm.fork();
    let started = Instant::now();
    for pos in 0..decode_n {
        seq.forward(&[short[pos % short.len()]], pos)?;
    }
    let decode = decode_n as f64 / started.elapsed().as_secs_f64();
    let (lc_pp, lc_tg, lc_note) = match llama_bench(&m.generator_path, 256, 5) {
        Some((pp, tg)) => (pp, tg, "llama.cpp (measured now)"),
        None => (205.0, 90.0, "llama.cpp*"),
    };
    emit(
        &mut out,
        format!("\ngeneration (SmolLM2-135M-Instruct Q4_1)              ragchat   {lc_note}   stock candle*\n"),
    );
    emit(
        &mut out,
        format!(
            "  prefill tok/s (256-token prompt)                 {prefill:>8.1}   {lc_pp:>8.1}     {:>8.1}\n",
            67.0
        ),
    );
    emit(
        &mut out,
        format!(
            "  decode tok/s, 1 stream (tg64, empty context)     {decode:>8.1}   {lc_tg:>8.1}     {:>8.1}\n",
            50.0
        ),
    );
    emit(
        &mut out,
        format!(
            "  decode tok/s, 1 stream after a 256-token prompt  {decode_after_prompt:>8.1}   {:>8}     {:>8}\n",
            "n/a", "n/a"
        ),
    );

    // Eight sequences decoding together, straight on the model (what llama.cpp's
    // batched bench measures: decode only, prompts already in the caches).
    let mut seqs: Vec<Box<dyn ragchat_actors::inference::CausalLm>> = (0..8).map(|_| lm.fork()).collect();
    for s in seqs.iter_mut() {
        s.forward(&short[..32], 0)?;
    }
    let started = Instant::now();
    for step in 0..decode_n {
        let mut refs: Vec<&mut Box<dyn ragchat_actors::inference::CausalLm>> = seqs.iter_mut().collect();
        let toks: Vec<u32> = (0..8).map(|i| short[(step + i) % short.len()]).collect();
        lm.decode_batch(&mut refs, &toks, &[32 + step; 8])?;
    }
    let batched = (8 * decode_n) as f64 / started.elapsed().as_secs_f64();
    drop(seqs);
    let (lc_b8, lc_b8_note) = match llama_batched_bench(&m.generator_path, 32, 64, 8) {
        Some(v) => (format!("{v:>8.1}"), "llama-batched-bench, measured now"),
        None => (format!("{:>8}", "n/a"), "llama-batched-bench not built"),
    };
    emit(
        &mut out,
        format!(
            "  decode tok/s, 8 sequences in one batch (model)   {batched:>8.1}   {lc_b8}     {:>8}   ({lc_b8_note})\n",
            "n/a"
        ),
    );

    let gen = GenerateWorker::start(
        Box::new(move || Ok(lm.fork())),
        tok.clone(),
        GenerateConfig {
            max_active: 8,
            queue_capacity: 64,
            // Whole prompts, as the figures in BENCHMARKS.md were measured.
            prefill_chunk: 0,
            // Every prompt prefilled whole: the figures compare forwards.
            prompt_cache_bytes: 0,
        },
    )?;
    let greedy = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        repetition_penalty: 1.0,
        seed: Some(1),
        ..SamplingParams::default()
    };
    let run = |prompt: Vec<u32>, max_tokens: usize| {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let submitted = Instant::now();
        let ok = gen.submit(GenerateRequest {
            prompt_tokens: prompt,
            params: greedy.clone(),
            max_tokens,
            stop: vec![],
            events: tx,
            cache_scope: None,
        });
        async move {
            ok.map_err(|e| anyhow::anyhow!(e.to_string()))?;
            let mut first = None;
            let mut n = 0usize;
            while let Some(ev) = rx.recv().await {
                match ev {
                    GenEvent::Token { .. } => {
                        first.get_or_insert_with(|| submitted.elapsed());
                    }
                    GenEvent::Done { completion_tokens, .. } => {
                        n = completion_tokens;
                        break;
                    }
                    GenEvent::Error(e) => anyhow::bail!(e),
                }
            }
            Ok::<_, anyhow::Error>((first.unwrap_or_default(), n))
        }
    };
    let started = Instant::now();
    let streams = futures_util::future::join_all((0..8).map(|_| run(short[..32].to_vec(), 64))).await;
    let total: usize = streams.iter().filter_map(|r| r.as_ref().ok()).map(|r| r.1).sum();
    let aggregate = total as f64 / started.elapsed().as_secs_f64();
    let ttft1 = run(long_prompt.clone(), 1).await?.0;
    let ttft8: Vec<Duration> = futures_util::future::join_all((0..8).map(|_| run(long_prompt.clone(), 1)))
        .await
        .into_iter()
        .filter_map(|r| r.ok().map(|x| x.0))
        .collect();
    let ttft8_max = ttft8.iter().max().copied().unwrap_or_default();
    let ttft8_mean = ttft8.iter().sum::<Duration>() / u32::try_from(ttft8.len().max(1)).unwrap_or(1);

    emit(
        &mut out,
        format!(
            "  decode tok/s, 8 streams through GenerateWorker   {aggregate:>8.1}   {:>8.1}     {:>8}   (with their prefills)\n",
            122.0, "n/a"
        ),
    );
    emit(
        &mut out,
        format!(
            "  time to first token, 1000-token prompt: 1 request {:.0} ms; 8 concurrent mean {:.0} ms, max {:.0} ms\n",
            ms(ttft1),
            ms(ttft8_mean),
            ms(ttft8_max)
        ),
    );
    emit(&mut out, String::from("\n* reference figures from issue 5 (development machine), shown where the tool is not installed here; llama.cpp is measured now when scripts/build-llama-cpp has built it.\n"));
    Ok(out)
}

/// A llama.cpp tool built by scripts/build-llama-cpp, if it is there.
fn llama_cpp_bin(name: &str) -> Option<std::path::PathBuf> {
    let home = std::env::var("HOME").ok()?;
    Some(
        std::path::Path::new(&home)
            .join(".cache/ragchat-llama-cpp/bin")
            .join(name),
    )
    .filter(|p| p.exists())
}

/// llama.cpp's llama-batched-bench with `npl` sequences of `npp` + `ntg` tokens,
/// 2 threads: the aggregate decode rate (S_TG, tok/s), when it is installed.
pub(super) fn llama_batched_bench(gguf: &str, npp: usize, ntg: usize, npl: usize) -> Option<f64> {
    // LLAMA_BENCH naming a missing file turns both llama.cpp baselines off.
    if std::env::var("LLAMA_BENCH").is_ok_and(|v| !std::path::Path::new(&v).exists()) {
        return None;
    }
    let bin = llama_cpp_bin("llama-batched-bench")?;
    let (npp, ntg, npl) = (npp.to_string(), ntg.to_string(), npl.to_string());
    let out = std::process::Command::new(bin)
        .args([
            "-m", gguf, "-t", "2", "-c", "4096", "-npp", &npp, "-ntg", &ntg, "-npl", &npl,
        ])
        .output()
        .ok()?;
    // Table row: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let cells: Vec<&str> = l.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        (cells.len() >= 8 && cells[2] == npl)
            .then(|| cells[7].parse().ok())
            .flatten()
    })
}

/// Runs llama.cpp's llama-bench on the same GGUF with 2 threads when it is installed
/// (scripts/build-llama-cpp, or LLAMA_BENCH=path): (prefill of `prompt` tokens,
/// decode tg64) tok/s, each the mean of `reps` runs.
pub(super) fn llama_bench(gguf: &str, prompt: usize, reps: usize) -> Option<(f64, f64)> {
    let bin = match std::env::var("LLAMA_BENCH") {
        Ok(path) => Some(std::path::PathBuf::from(path)).filter(|p| p.exists())?,
        Err(_) => llama_cpp_bin("llama-bench")?,
    };
    let out = std::process::Command::new(bin)
        .args([
            "-m",
            gguf,
            "-t",
            "2",
            "-p",
            &prompt.to_string(),
            "-n",
            "64",
            "-r",
            &reps.to_string(),
            "-o",
            "json",
        ])
        .output()
        .ok()?;
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let rate = |prompt: bool| {
        rows.as_array()?.iter().find_map(|r| {
            let is_prompt = r["n_prompt"].as_u64().unwrap_or(0) > 0 && r["n_gen"].as_u64().unwrap_or(0) == 0;
            (is_prompt == prompt).then(|| r["avg_ts"].as_f64()).flatten()
        })
    };
    Some((rate(true)?, rate(false)?))
}
