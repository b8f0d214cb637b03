//! Remote inference: generation and embeddings served by an OpenAI-compatible
//! server (llama.cpp's llama-server, vLLM, TGI, text-embeddings-inference)
//! instead of in this process, chosen in config (`models.generator_url`,
//! `models.embedder_url`).
//!
//! Generation goes through `POST {url}/v1/completions` with the prompt as token
//! ids (our tokenizer of the same model counts the context; the server's
//! `usage` counts what is billed) and `stream: true`; the tokens flow into the
//! request's events like the local worker's. A client that leaves closes its
//! event channel: the HTTP request is dropped, which makes the server stop.
//!
//! Every call has a timeout (to the response head, then between chunks).
//! A call that got no answer (refused, timed out, 429/5xx) is retried with
//! backoff while nothing was produced: a completion before its first token, an
//! embedding always (idempotent). A circuit breaker opens after
//! `remote_breaker_failures` failures in a row: calls then fail at once with a
//! 503 naming the server for `remote_breaker_secs`, after which one call tries
//! again.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ragchat_actors::generate_worker::{FinishReason, GenEvent, GenStats, GenerateRequest, RemoteGenerate};
use ragchat_actors::inference::{Embedder, ModelError};
use serde_json::{json, Value};

/// How to reach one server.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Base URL (`http://host:port`); `/v1/...` is appended.
    pub url: String,
    pub api_key: Option<String>,
    /// The `model` field of requests.
    pub model: String,
    /// To the response head, and between two chunks of a stream.
    pub timeout: Duration,
    /// Retries of a call that got no answer.
    pub retries: u32,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
    /// Requests at once; more are refused as overloaded.
    pub max_in_flight: usize,
}

/// Failures in a row open it: calls are refused until `open` has passed, then
/// one goes through; its success closes it, its failure opens it again.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open: Duration,
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    pub fn new(threshold: u32, open: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            open,
            failures: AtomicU32::new(0),
            open_until: Mutex::new(None),
        }
    }

    /// Ok when a call may go; else how long the breaker stays open.
    pub fn check(&self, now: Instant) -> Result<(), Duration> {
        let mut until = self.open_until.lock().unwrap_or_else(|p| p.into_inner());
        match *until {
            Some(t) if now < t => Err(t - now),
            Some(_) => {
                // Half-open: this call is the trial; others wait for its outcome
                // for another period.
                *until = Some(now + self.open);
                Ok(())
            }
            None => Ok(()),
        }
    }

    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        *self.open_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub fn failure(&self, now: Instant) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.threshold {
            *self.open_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(now + self.open);
            metrics::counter!("remote_inference_breaker_opened_total").increment(1);
        }
    }
}

/// What one call to the server came to, before its body is read.
enum Attempt {
    Answered(reqwest::Response),
    /// The server refused the request itself (4xx other than 429): not retried.
    Refused(ModelError),
}

struct Client {
    http: reqwest::Client,
    config: RemoteConfig,
    breaker: Breaker,
    /// "generation" or "embeddings", for messages and metrics.
    what: &'static str,
}

impl Client {
    fn new(config: RemoteConfig, what: &'static str) -> Result<Client, ModelError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .build()
            .map_err(|e| ModelError::Internal(format!("inference client: {e}")))?;
        Ok(Client {
            breaker: Breaker::new(config.breaker_failures, config.breaker_open),
            http,
            config,
            what,
        })
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.config.url.trim_end_matches('/'))
    }

    fn down(&self, why: impl std::fmt::Display) -> ModelError {
        ModelError::Unavailable(format!(
            "the {} server at {} is not answering: {why}",
            self.what, self.config.url
        ))
    }

    fn gate(&self) -> Result<(), ModelError> {
        self.breaker.check(Instant::now()).map_err(|left| {
            ModelError::Unavailable(format!(
                "the {} server at {} failed {} times in a row; not tried again for {} s",
                self.what,
                self.config.url,
                self.config.breaker_failures,
                left.as_secs() + 1
            ))
        })
    }

    /// POSTs `body`, retrying (with backoff) calls that got no answer, while
    /// `still_wanted` says so. The breaker learns each outcome.
    async fn post(&self, path: &str, body: &Value, still_wanted: impl Fn() -> bool) -> Result<Attempt, ModelError> {
        let mut wait = Duration::from_millis(200);
        let mut tries = 0;
        loop {
            self.gate()?;
            let mut req = self.http.post(self.endpoint(path)).json(body);
            if let Some(key) = &self.config.api_key {
                req = req.bearer_auth(key);
            }
            let failure = match tokio::time::timeout(self.config.timeout, req.send()).await {
                Ok(Ok(resp)) if resp.status().is_success() => return Ok(Attempt::Answered(resp)),
                Ok(Ok(resp)) if resp.status().is_client_error() && resp.status().as_u16() != 429 => {
                    // The server is up; the request was wrong for it.
                    self.breaker.success();
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    let detail: String = text.chars().take(300).collect();
                    return Ok(Attempt::Refused(ModelError::Invalid(format!(
                        "the {} server refused the request ({status}): {detail}",
                        self.what
                    ))));
                }
                Ok(Ok(resp)) => format!("it answered {}", resp.status()),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {} ms", self.config.timeout.as_millis()),
            };
            self.breaker.failure(Instant::now());
            metrics::counter!("remote_inference_failures_total", "kind" => self.what).increment(1);
            tries += 1;
            if tries > self.config.retries || !still_wanted() {
                return Err(self.down(failure));
            }
            tracing::warn!(server = %self.config.url, error = %failure, retry_in_ms = wait.as_millis() as u64, "inference call failed; retrying");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }
}

/// Generation by a remote server (see the module docs).
pub struct RemoteGenerator {
    client: Arc<Client>,
    slots: Arc<tokio::sync::Semaphore>,
    stats: Arc<GenStats>,
}

impl RemoteGenerator {
    pub fn new(config: RemoteConfig, stats: Arc<GenStats>) -> Result<Self, ModelError> {
        let slots = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.max(1)));
        Ok(RemoteGenerator {
            client: Arc::new(Client::new(config, "generation")?),
            slots,
            stats,
        })
    }
}

impl RemoteGenerate for RemoteGenerator {
    fn submit(&self, req: GenerateRequest) -> Result<(), ModelError> {
        self.client.gate()?;
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            ModelError::Overloaded(format!(
                "{} answers are in progress on the generation server",
                self.client.config.max_in_flight
            ))
        })?;
        let (client, stats) = (self.client.clone(), self.stats.clone());
        stats.active.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let events = req.events.clone();
            match generate(&client, &stats, req).await {
                Ok(()) => {}
                Err(e) => {
                    stats.last_error.note(e.to_string());
                    let _ = events.send(GenEvent::Error(e));
                }
            }
            stats.active.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
        Ok(())
    }
}

/// One streamed completion; an error is the request's (already counted).
async fn generate(client: &Client, stats: &GenStats, req: GenerateRequest) -> Result<(), ModelError> {
    let started = Instant::now();
    let p = &req.params;
    let mut body = json!({
        "model": client.config.model,
        "prompt": req.prompt_tokens,
        "max_tokens": req.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if p.top_k > 0 {
        body["top_k"] = json!(p.top_k);
    }
    if p.repetition_penalty != 1.0 {
        // vLLM's name, then llama-server's.
        body["repetition_penalty"] = json!(p.repetition_penalty);
        body["repeat_penalty"] = json!(p.repetition_penalty);
    }
    if let Some(seed) = p.seed {
        body["seed"] = json!(seed);
    }
    if !req.stop.is_empty() {
        body["stop"] = json!(req.stop);
    }
    let events = req.events.clone();
    let resp = match client.post("/v1/completions", &body, || !events.is_closed()).await? {
        Attempt::Answered(r) => r,
        Attempt::Refused(e) => return Err(e),
    };
    let mut stream = resp.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    let (mut finish, mut usage): (Option<FinishReason>, Option<(usize, usize)>) = (None, None);
    let (mut chunks, mut first_token_ms) = (0usize, None);
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(client.config.timeout, stream.next()) => next,
            // The client left: dropping the stream ends the server's work.
            () = req.events.closed() => {
                stats.cancelled.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        };
        let bytes = match next {
            Ok(Some(Ok(b))) => b,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                client.breaker.failure(Instant::now());
                return Err(client.down(format!("the answer broke off: {e}")));
            }
            Err(_) => {
                client.breaker.failure(Instant::now());
                return Err(client.down(format!(
                    "nothing for {} ms in the middle of an answer",
                    client.config.timeout.as_millis()
                )));
            }
        };
        buffer.extend_from_slice(&bytes);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(data)
                .map_err(|e| client.down(format!("an unreadable stream chunk ({e}): {data:.200}")))?;
            if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
                let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
                usage = Some((n("prompt_tokens"), n("completion_tokens")));
            }
            let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) else {
                continue;
            };
            if let Some(text) = choice["text"].as_str().filter(|t| !t.is_empty()) {
                chunks += 1;
                first_token_ms.get_or_insert_with(|| started.elapsed().as_secs_f64() * 1000.0);
                stats.tokens.fetch_add(1, Ordering::Relaxed);
                if req.events.send(GenEvent::Token { text: text.to_string() }).is_err() {
                    stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
            }
            match choice["finish_reason"].as_str() {
                Some("length") => finish = Some(FinishReason::Length),
                Some(_) => finish = Some(FinishReason::Stop),
                None => {}
            }
        }
    }
    client.breaker.success();
    let (prompt_tokens, completion_tokens) = usage.unwrap_or((req.prompt_tokens.len(), chunks));
    let finish_reason = finish.unwrap_or(if completion_tokens >= req.max_tokens {
        FinishReason::Length
    } else {
        FinishReason::Stop
    });
    let _ = req.events.send(GenEvent::Done {
        finish_reason,
        prompt_tokens,
        completion_tokens,
        first_token_ms: first_token_ms.unwrap_or(started.elapsed().as_secs_f64() * 1000.0),
        cached_tokens: 0,
    });
    Ok(())
}

/// Embeddings by a remote server: `POST {url}/v1/embeddings`, vectors
/// L2-normalized here. Runs on the embed worker's thread, on a runtime of its own.
pub struct RemoteEmbedder {
    client: Client,
    runtime: tokio::runtime::Runtime,
    dimensions: usize,
    max_tokens: usize,
    /// The same model's tokenizer, when its folder has one (batching by length);
    /// else about four characters a token.
    tokenizer: Option<tokenizers::Tokenizer>,
}

impl RemoteEmbedder {
    /// Connects and learns the vectors' size from one call (on a thread of its
    /// own: the caller may be inside an async runtime, where this one cannot block).
    pub fn connect(
        config: RemoteConfig,
        max_tokens: usize,
        tokenizer: Option<tokenizers::Tokenizer>,
    ) -> Result<Self, ModelError> {
        std::thread::spawn(move || Self::connect_here(config, max_tokens, tokenizer))
            .join()
            .map_err(|_| ModelError::Internal("the embedding client panicked while connecting".into()))?
    }

    fn connect_here(
        config: RemoteConfig,
        max_tokens: usize,
        tokenizer: Option<tokenizers::Tokenizer>,
    ) -> Result<Self, ModelError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ModelError::Internal(format!("embedding client runtime: {e}")))?;
        let mut e = RemoteEmbedder {
            client: Client::new(config, "embeddings")?,
            runtime,
            dimensions: 0,
            max_tokens,
            tokenizer,
        };
        let probe = e.embed(&["dimensions"])?;
        e.dimensions = probe.first().map(Vec::len).unwrap_or(0);
        if e.dimensions == 0 {
            return Err(e.client.down("it answered an empty vector"));
        }
        Ok(e)
    }
}

impl Embedder for RemoteEmbedder {
    fn dimensions(&self) -> usize {
        self.dimensions
    }

    fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    fn count_tokens(&self, text: &str) -> Result<usize, ModelError> {
        let n = match &self.tokenizer {
            Some(t) => t
                .encode(text, true)
                .map_err(|e| ModelError::Internal(e.to_string()))?
                .len(),
            None => text.chars().count() / 4 + 1,
        };
        Ok(n.min(self.max_tokens))
    }

    fn embed(&mut self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        let body = json!({"model": self.client.config.model, "input": texts});
        let client = &self.client;
        let vectors = self.runtime.block_on(async {
            let resp = match client.post("/v1/embeddings", &body, || true).await? {
                Attempt::Answered(r) => r,
                Attempt::Refused(e) => return Err(e),
            };
            let v: Value = tokio::time::timeout(client.config.timeout, resp.json())
                .await
                .map_err(|_| client.down("the vectors did not arrive in time"))?
                .map_err(|e| client.down(format!("unreadable vectors: {e}")))?;
            let mut data: Vec<(u64, Vec<f32>)> = v["data"]
                .as_array()
                .ok_or_else(|| client.down("no data in the answer"))?
                .iter()
                .map(|d| {
                    let index = d["index"].as_u64().unwrap_or(0);
                    let vector = d["embedding"]
                        .as_array()
                        .map(|xs| xs.iter().map(|x| x.as_f64().unwrap_or(0.0) as f32).collect())
                        .unwrap_or_default();
                    (index, vector)
                })
                .collect();
            data.sort_by_key(|(i, _)| *i);
            Ok(data.into_iter().map(|(_, v)| v).collect::<Vec<Vec<f32>>>())
        })?;
        if vectors.len() != texts.len() {
            return Err(self
                .client
                .down(format!("{} vectors for {} texts", vectors.len(), texts.len())));
        }
        if self.dimensions > 0 && vectors.iter().any(|v| v.len() != self.dimensions) {
            return Err(self.client.down("vectors of another size than before"));
        }
        Ok(vectors.into_iter().map(normalized).collect())
    }
}

fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_and_lets_one_trial_through() {
        let b = Breaker::new(3, Duration::from_secs(10));
        let t = Instant::now();
        b.failure(t);
        b.failure(t);
        assert!(b.check(t).is_ok());
        // A success in between starts the count again.
        b.success();
        b.failure(t);
        b.failure(t);
        assert!(b.check(t).is_ok());
        b.failure(t);
        let left = b.check(t + Duration::from_secs(4)).expect_err("open");
        assert_eq!(left, Duration::from_secs(6));
        // After the period one trial goes; the next waits for its outcome.
        assert!(b.check(t + Duration::from_secs(10)).is_ok());
        assert!(b.check(t + Duration::from_secs(11)).is_err());
        b.success();
        assert!(b.check(t + Duration::from_secs(11)).is_ok());
    }

    #[test]
    fn vectors_are_normalized() {
        assert_eq!(normalized(vec![3.0, 4.0]), vec![0.6, 0.8]);
        assert_eq!(normalized(vec![0.0, 0.0]), vec![0.0, 0.0]);
    }
}
