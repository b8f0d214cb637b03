//! PDF text in a child process. A PDF is a program for a parser: a few kilobytes can
//! inflate to gigabytes, and a hostile file can send a parser into a loop. So the
//! server never parses one itself: it runs this same binary with the hidden
//! subcommand [`SUBCOMMAND`], which limits its own address space, CPU time and
//! file writes (`setrlimit`) before it reads the PDF from stdin and writes the text
//! to stdout. The parent feeds it, reads at most the allowed text, kills it past a
//! wall-clock deadline, and turns every way it can end into a `PdfError`.
//! At most `max_concurrent` children run at once.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How reading a PDF failed; `formats` turns it into its `FormatError`.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PdfError {
    /// A bad file, or one that hit the reader's limits (422).
    #[error("{0}")]
    Invalid(String),
    /// More text than one document may hold (413).
    #[error("{0}")]
    TooLarge(String),
    /// No reader free, or none installed (503).
    #[error("{0}")]
    Unavailable(String),
}

/// The hidden subcommand: `ragchat __extract-pdf <max memory bytes> <max cpu secs> <max text bytes>`.
pub const SUBCOMMAND: &str = "__extract-pdf";

/// Exit codes of the child besides 0 (the text is on stdout).
const EXIT_UNREADABLE: i32 = 2;
const EXIT_TOO_MUCH_TEXT: i32 = 3;
const EXIT_USAGE: i32 = 64;
/// The child's one line for the parent among whatever the parser prints to stderr.
const MESSAGE: &str = "ragchat-extract-error: ";

/// How a PDF may be read (`knowledge.pdf_*` in the configuration).
#[derive(Debug, Clone)]
pub struct PdfLimits {
    /// The program to run; `None`: this process's own executable.
    pub program: Option<PathBuf>,
    pub max_memory_bytes: u64,
    pub max_cpu_secs: u64,
    /// Wall-clock limit (a child blocked on something other than CPU is killed too).
    pub timeout: Duration,
    /// The most text one PDF may yield.
    pub max_text_bytes: usize,
    /// Children running at once, shared by everyone holding these limits.
    pub slots: Arc<Slots>,
}

/// A counting semaphore for blocking threads (extraction runs on the blocking pool).
#[derive(Debug)]
pub struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    pub fn new(n: usize) -> Arc<Slots> {
        Arc::new(Slots {
            free: Mutex::new(n.max(1)),
            freed: Condvar::new(),
        })
    }

    /// The slots of this process (the memory they bound is the process's): made
    /// with the first `n` asked for.
    pub fn process_wide(n: usize) -> Arc<Slots> {
        static SLOTS: std::sync::OnceLock<Arc<Slots>> = std::sync::OnceLock::new();
        SLOTS.get_or_init(|| Slots::new(n)).clone()
    }

    /// Waits up to `wait` for a slot.
    fn take(self: &Arc<Self>, wait: Duration) -> Option<Slot> {
        let deadline = Instant::now() + wait;
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            let left = deadline.checked_duration_since(Instant::now())?;
            free = self.freed.wait_timeout(free, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        *free -= 1;
        Some(Slot(self.clone()))
    }
}

struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

/// Extracts the text layer of `bytes` in a limited child process. Blocking: call
/// it off the async workers.
pub fn extract_text(filename: &str, bytes: &[u8], limits: &PdfLimits) -> Result<String, PdfError> {
    let _slot = limits
        .slots
        .take(limits.timeout)
        .ok_or_else(|| PdfError::Unavailable("Too many PDFs are being read right now: try again shortly".into()))?;
    let program = match &limits.program {
        Some(p) => p.clone(),
        None => {
            std::env::current_exe().map_err(|e| PdfError::Unavailable(format!("PDF extraction is unavailable: {e}")))?
        }
    };
    let mut child = Command::new(&program)
        .arg(SUBCOMMAND)
        .arg(limits.max_memory_bytes.to_string())
        .arg(limits.max_cpu_secs.to_string())
        .arg(limits.max_text_bytes.to_string())
        // The child parses hostile input: it gets no secrets from our environment.
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            tracing::error!(program = %program.display(), error = %e, "cannot start the PDF extractor");
            PdfError::Unavailable("PDF extraction is unavailable on this server".into())
        })?;
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let deadline = Instant::now() + limits.timeout;
    let max_text = limits.max_text_bytes;
    let (ended, text, message) = std::thread::scope(|s| {
        s.spawn(move || {
            if let Some(mut w) = stdin {
                // A child that dies early closes the pipe: nothing to report here.
                let _ = w.write_all(bytes);
            }
        });
        let text = s.spawn(move || {
            let mut buf = Vec::new();
            if let Some(r) = stdout {
                let _ = r.take(max_text as u64 + 1).read_to_end(&mut buf);
            }
            buf
        });
        let message = s.spawn(move || {
            // Read everything (a full pipe would block the child), keep our line.
            let mut found = None;
            if let Some(r) = stderr {
                let mut all = Vec::new();
                let _ = r.take(1 << 20).read_to_end(&mut all);
                found = String::from_utf8_lossy(&all)
                    .lines()
                    .find_map(|l| l.strip_prefix(MESSAGE).map(|m| m.chars().take(300).collect::<String>()));
            }
            found
        });
        let ended = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        (ended, text.join().unwrap_or_default(), message.join().ok().flatten())
    });
    let limits_hint = || {
        format!(
            "'{filename}' could not be read within the limits for a PDF ({} MiB of memory, {} s): it may be corrupt or built to exhaust the reader",
            limits.max_memory_bytes >> 20,
            limits.timeout.as_secs().min(limits.max_cpu_secs)
        )
    };
    if text.len() > max_text {
        // However it ended (it may have died writing into the pipe we closed).
        return Err(too_much_text(filename, max_text));
    }
    let Some(status) = ended else {
        return Err(PdfError::Invalid(limits_hint()));
    };
    match status.code() {
        Some(0) => String::from_utf8(text)
            .map_err(|_| PdfError::Invalid(format!("'{filename}' yielded text that is not UTF-8"))),
        Some(EXIT_TOO_MUCH_TEXT) => Err(too_much_text(filename, max_text)),
        Some(EXIT_UNREADABLE) => Err(PdfError::Invalid(format!(
            "'{filename}' is not a readable PDF: {}",
            message.unwrap_or_else(|| "corrupt or unsupported".into())
        ))),
        Some(EXIT_USAGE) => {
            tracing::error!(program = %program.display(), "the PDF extractor did not understand its arguments");
            Err(PdfError::Unavailable(
                "PDF extraction is unavailable on this server".into(),
            ))
        }
        // Killed by a signal (CPU limit, an allocation refused under the memory
        // limit) or any other end.
        _ => Err(PdfError::Invalid(limits_hint())),
    }
}

fn too_much_text(filename: &str, max: usize) -> PdfError {
    PdfError::TooLarge(format!(
        "'{filename}' holds more than {max} bytes of text, the limit for one document"
    ))
}

/// The child: `ragchat __extract-pdf <max memory> <max cpu secs> <max text>`, the PDF
/// on stdin. Runs before any runtime or thread is started.
pub fn child_main(args: &[String]) -> ExitCode {
    let parsed = match args {
        [mem, cpu, text] => mem
            .parse::<u64>()
            .ok()
            .zip(cpu.parse::<u64>().ok())
            .zip(text.parse::<usize>().ok()),
        _ => None,
    };
    let Some(((mem, cpu), max_text)) = parsed else {
        eprintln!("usage: ragchat {SUBCOMMAND} <max memory bytes> <max cpu seconds> <max text bytes> < file.pdf");
        return ExitCode::from(EXIT_USAGE as u8);
    };
    let limited = limit(libc::RLIMIT_AS, mem, mem)
        && limit(libc::RLIMIT_CPU, cpu, cpu.saturating_add(1))
        && limit(libc::RLIMIT_FSIZE, 0, 0)
        && limit(libc::RLIMIT_CORE, 0, 0);
    if !limited {
        eprintln!("{MESSAGE}cannot set resource limits");
        return ExitCode::from(EXIT_USAGE as u8);
    }
    // The text goes to the original stdout; anything the parser prints lands on stderr.
    // SAFETY: plain descriptor calls on this process's own standard streams, before
    // any other thread exists.
    let out = unsafe {
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            return ExitCode::from(EXIT_USAGE as u8);
        }
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    let mut pdf = Vec::new();
    if std::io::stdin().lock().take(mem).read_to_end(&mut pdf).is_err() {
        eprintln!("{MESSAGE}cannot read the file");
        return ExitCode::from(EXIT_UNREADABLE as u8);
    }
    std::panic::set_hook(Box::new(|_| {}));
    let text = std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem(&pdf));
    match text {
        Ok(Ok(text)) if text.len() > max_text => ExitCode::from(EXIT_TOO_MUCH_TEXT as u8),
        Ok(Ok(text)) => {
            let mut out = std::io::BufWriter::new(out);
            match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(EXIT_UNREADABLE as u8),
            }
        }
        Ok(Err(e)) => {
            eprintln!("{MESSAGE}{}", e.to_string().replace('\n', " "));
            ExitCode::from(EXIT_UNREADABLE as u8)
        }
        Err(_) => {
            eprintln!("{MESSAGE}corrupt or unsupported");
            ExitCode::from(EXIT_UNREADABLE as u8)
        }
    }
}

fn limit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> bool {
    let r = libc::rlimit {
        rlim_cur: soft as libc::rlim_t,
        rlim_max: hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we pass; it only lowers this process's limits.
    unsafe { libc::setrlimit(resource, &r) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in extractor: a shell script, to test how the parent supervises it.
    fn script(body: &str) -> (tempdir::Dir, PdfLimits) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("extract.sh");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let limits = PdfLimits {
            program: Some(path),
            max_memory_bytes: 64 << 20,
            max_cpu_secs: 5,
            timeout: Duration::from_millis(800),
            max_text_bytes: 1000,
            slots: Slots::new(1),
        };
        (dir, limits)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!("ragchat-pdf-{}", uuid::Uuid::new_v4()));
                std::fs::create_dir_all(&p).expect("temp dir");
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn passes_the_limits_and_returns_the_text() {
        let (_d, l) = script(r#"cat >/dev/null; printf 'args:%s %s %s %s' "$1" "$2" "$3" "$4""#);
        let text = extract_text("a.pdf", b"%PDF-1.4", &l).expect("text");
        assert_eq!(text, format!("args:{SUBCOMMAND} {} 5 1000", 64 << 20));
    }

    #[test]
    fn a_hanging_extractor_is_killed_at_the_deadline() {
        let (_d, l) = script("exec sleep 30");
        let t = Instant::now();
        let e = extract_text("slow.pdf", b"%PDF-1.4", &l).expect_err("killed");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(
            matches!(&e, PdfError::Invalid(m) if m.contains("within the limits")),
            "{e:?}"
        );
    }

    #[test]
    fn too_much_text_is_too_large_however_the_child_ends() {
        // Writes far more than allowed: the parent stops reading at the limit.
        let (_d, l) = script("cat >/dev/null; yes 0123456789 | head -c 10000000");
        let e = extract_text("big.pdf", b"%PDF-1.4", &l).expect_err("too large");
        assert!(matches!(&e, PdfError::TooLarge(m) if m.contains("1000 bytes")), "{e:?}");
        let (_d, l) = script(&format!("cat >/dev/null; exit {EXIT_TOO_MUCH_TEXT}"));
        assert!(matches!(
            extract_text("big.pdf", b"%PDF", &l),
            Err(PdfError::TooLarge(_))
        ));
    }

    #[test]
    fn the_childs_message_reaches_the_client_and_noise_does_not() {
        let (_d, l) = script(&format!(
            "cat >/dev/null; echo 'parser noise /home/secret' >&2; echo '{MESSAGE}bad xref table' >&2; exit {EXIT_UNREADABLE}"
        ));
        let e = extract_text("x.pdf", b"%PDF-1.4", &l).expect_err("unreadable");
        assert_eq!(
            e,
            PdfError::Invalid("'x.pdf' is not a readable PDF: bad xref table".into())
        );
    }

    #[test]
    fn a_child_killed_by_a_signal_hit_a_limit() {
        let (_d, l) = script("cat >/dev/null; kill -9 $$");
        let e = extract_text("bomb.pdf", b"%PDF-1.4", &l).expect_err("killed");
        assert!(matches!(&e, PdfError::Invalid(m) if m.contains("64 MiB")), "{e:?}");
    }

    #[test]
    fn a_missing_extractor_is_unavailable_not_the_clients_fault() {
        let (_d, mut l) = script("true");
        l.program = Some("/nonexistent/ragchat".into());
        assert!(matches!(
            extract_text("a.pdf", b"%PDF", &l),
            Err(PdfError::Unavailable(_))
        ));
    }

    #[test]
    fn slots_bound_the_children_running_at_once() {
        let slots = Slots::new(1);
        let held = slots.take(Duration::ZERO).expect("first");
        assert!(slots.take(Duration::from_millis(20)).is_none());
        drop(held);
        assert!(slots.take(Duration::ZERO).is_some());
    }
}
