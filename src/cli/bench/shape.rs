//! `ragchat bench models --shape qwen3-1.7b`: our forward on a GGUF with
//! Qwen3-1.7B's exact shape and random weights (written once, cached outside the
//! clone), beside llama.cpp's llama-bench and llama-batched-bench on the same file
//! in the same run: prefill (pp512), decode from an empty context (tg64) and
//! eight sequences decoding in one batch. Decode reads every weight once per
//! step, so the machine's read bandwidth over the file's size bounds it; that
//! bound is printed with the figures.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ragchat::inference::synthetic::{write_qwen3, Layout, QWEN3_1_7B};
use ragchat_actors::inference::CausalLm;

use super::models::{llama_batched_bench, llama_bench};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Shape {
    /// Qwen/Qwen3-1.7B: 28 layers, hidden 2048, 16 heads (8 kv) of 128, ffn 6144, vocab 151936, tied.
    #[value(name = "qwen3-1.7b")]
    Qwen3_1_7b,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LayoutArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k_m")]
    Q4KM,
}

impl LayoutArg {
    fn layout(self) -> Layout {
        match self {
            LayoutArg::Q8_0 => Layout::Q8_0,
            LayoutArg::Q4KM => Layout::Q4KM,
        }
    }
}

fn cache_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var("HOME").map_err(|_| anyhow::anyhow!("HOME is not set"))?;
    let dir = Path::new(&home).join(".cache/ragchat-bench");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// GB/s of reading a 1 GiB buffer with every thread (each sums its own part).
fn read_bandwidth(threads: usize) -> f64 {
    let words = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let part = words.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..3 {
        let started = Instant::now();
        let sum: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(part)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, b| a.wrapping_add(*b))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / started.elapsed().as_secs_f64() / 1e9);
    }
    best
}

struct Ours {
    pp512: f64,
    tg64: f64,
    batch8: f64,
}

fn measure_ours(lm: &dyn CausalLm, vocab: usize) -> anyhow::Result<Ours> {
    // Ordinary (filler) token ids, spread over the vocabulary.
    let token = |i: usize| ((300 + i * 7919) % (vocab - 300)) as u32 + 256;
    let prompt: Vec<u32> = (0..512).map(token).collect();
    let mut seq = lm.fork();
    let started = Instant::now();
    seq.forward(&prompt, 0)?;
    let pp512 = 512.0 / started.elapsed().as_secs_f64();
    drop(seq);

    let mut seq = lm.fork();
    let started = Instant::now();
    for pos in 0..64 {
        seq.forward(&[token(pos)], pos)?;
    }
    let tg64 = 64.0 / started.elapsed().as_secs_f64();
    drop(seq);

    // As llama-batched-bench -npp 32 -ntg 64 -npl 8: the decode steps only.
    let mut seqs: Vec<Box<dyn CausalLm>> = (0..8).map(|_| lm.fork()).collect();
    for (i, s) in seqs.iter_mut().enumerate() {
        let p: Vec<u32> = (0..32).map(|j| token(i * 32 + j)).collect();
        s.forward(&p, 0)?;
    }
    let started = Instant::now();
    for step in 0..64 {
        let mut refs: Vec<&mut Box<dyn CausalLm>> = seqs.iter_mut().collect();
        let toks: Vec<u32> = (0..8).map(|i| token(1000 + step * 8 + i)).collect();
        lm.decode_batch(&mut refs, &toks, &[32 + step; 8])?;
    }
    let batch8 = (8 * 64) as f64 / started.elapsed().as_secs_f64();
    Ok(Ours { pp512, tg64, batch8 })
}

pub fn run(shape: Shape, layouts: &[LayoutArg]) -> anyhow::Result<String> {
    let (name, dims) = match shape {
        Shape::Qwen3_1_7b => ("qwen3-1.7b", QWEN3_1_7B),
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = String::new();
    let mut emit = |line: String| {
        print!("{line}");
        out.push_str(&line);
    };
    let bandwidth = read_bandwidth(threads);
    emit(format!(
        "machine: {threads} threads, read bandwidth {bandwidth:.1} GB/s (1 GiB summed by {threads} threads, best of 3)\n"
    ));
    for layout in layouts.iter().map(|l| l.layout()) {
        let path = cache_dir()?.join(format!("{name}-random-{}.gguf", layout.name()));
        if !path.exists() {
            emit(format!("writing {} (once; random weights) …\n", path.display()));
            let started = Instant::now();
            write_qwen3(&path, &dims, layout, 1)?;
            emit(format!("  written in {:.0} s\n", started.elapsed().as_secs_f64()));
        }
        let bytes = std::fs::metadata(&path)?.len() as f64;
        let bound = bandwidth * 1e9 / bytes;
        // The production setting: no f32 copy of the weights (config/production.toml).
        let started = Instant::now();
        let (lm, _) = ragchat::inference::gguf::load(&path, None, 1024, false)?;
        let load_s = started.elapsed().as_secs_f64();
        let ours = measure_ours(lm.as_ref(), dims.vocab)?;
        drop(lm);
        let file = path.to_string_lossy().to_string();
        let lc = llama_bench(&file, 512, 1);
        let lc_b8 = llama_batched_bench(&file, 32, 64, 8);
        let cell = |v: Option<f64>| v.map_or_else(|| format!("{:>9}", "not measured"), |v| format!("{v:>9.1}"));
        let ratio =
            |ours: f64, theirs: Option<f64>| theirs.map_or_else(|| "n/a".to_string(), |t| format!("{:.2}×", ours / t));
        emit(format!(
            "\n{name} {} ({:.2} GB, loaded in {load_s:.1} s)   ragchat   llama.cpp (now)   ratio\n",
            layout.name(),
            bytes / 1e9
        ));
        emit(format!(
            "  prefill tok/s (pp512)                      {:>9.1}   {}   {}\n",
            ours.pp512,
            cell(lc.map(|x| x.0)),
            ratio(ours.pp512, lc.map(|x| x.0))
        ));
        emit(format!(
            "  decode tok/s (tg64)                        {:>9.1}   {}   {}   (read bound {bound:.1})\n",
            ours.tg64,
            cell(lc.map(|x| x.1)),
            ratio(ours.tg64, lc.map(|x| x.1))
        ));
        emit(format!(
            "  decode tok/s, 8 sequences in one batch     {:>9.1}   {}   {}   (read bound {:.1})\n",
            ours.batch8,
            cell(lc_b8),
            ratio(ours.batch8, lc_b8),
            bound * 8.0
        ));
    }
    emit(String::from(
        "\nread bound: tok/s if each step only read the whole file once at the measured bandwidth (8 sequences share one read).\n\
         llama.cpp: llama-bench -p 512 -n 64 -r 1 and llama-batched-bench -npp 32 -ntg 64 -npl 8, 2 threads (scripts/build-llama-cpp).\n",
    ));
    Ok(out)
}
