//! The spool file: records framed one by one, appended and fsynced, read back in
//! order. Knows nothing of the store; the ledger decides what goes in and when
//! the file is emptied.
//!
//! A frame is an 11-byte header and a JSON payload:
//!
//! ```text
//! 0xFF 0x5A | version (1) | payload length (u32 LE) | crc32 (u32 LE) | payload
//! ```
//!
//! The crc32 covers the version, the length and the payload. 0xFF never occurs
//! in UTF-8, so never in a payload. A reader that meets anything but a whole
//! frame with the right checksum (a crash tore the last frame, a disk flipped a
//! bit, a length was overwritten) skips forward byte by byte to the next header
//! whose frame checks out: one damaged record costs that record, never the
//! records after it.
//!
//! Spools written before framing were JSON lines; such a file (its first byte is
//! `{`) is read line by line, and `migrate_legacy` rewrites it framed (into a
//! new file, then renamed over the old one: a crash leaves one or the other).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

const MAGIC: [u8; 2] = [0xFF, 0x5A];
const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 11;
/// A length above this is corruption (a usage record is a few hundred bytes).
const MAX_PAYLOAD: usize = 1 << 20;
/// Bytes read from the file at a time.
const READ_CHUNK: usize = 64 * 1024;

fn checksum(version: u8, len: [u8; 4], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[version]);
    h.update(&len);
    h.update(payload);
    h.finalize()
}

/// One record as a frame, appended to `out`.
pub fn encode<T: Serialize>(record: &T, out: &mut Vec<u8>) -> io::Result<()> {
    let payload = serde_json::to_vec(record).map_err(io::Error::other)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::other("spool record too large"));
    }
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&len);
    out.extend_from_slice(&checksum(VERSION, len, &payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// No file, or an empty one.
    Empty,
    Framed,
    /// JSON lines, as written before framing.
    Legacy,
}

pub fn format_of(path: &Path) -> io::Result<Format> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Format::Empty),
        Err(e) => return Err(e),
    };
    let mut head = [0u8; 64];
    let n = f.read(&mut head)?;
    Ok(format_of_head(&head[..n]))
}

fn format_of_head(head: &[u8]) -> Format {
    match head.iter().find(|b| !b.is_ascii_whitespace()) {
        None if head.is_empty() => Format::Empty,
        Some(b'{') => Format::Legacy,
        _ => Format::Framed,
    }
}

/// Appends `frames` (whole frames) and syncs; returns the file's length after.
pub fn append(path: &Path, frames: &[u8]) -> io::Result<u64> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let existed = path.exists();
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(frames)?;
    f.sync_data()?;
    if !existed {
        // The new file's name must survive a crash too.
        sync_dir(dir)?;
    }
    Ok(f.metadata()?.len())
}

fn sync_dir(dir: Option<&Path>) -> io::Result<()> {
    match dir {
        Some(d) => File::open(d)?.sync_all(),
        None => File::open(".")?.sync_all(),
    }
}

/// The file's length (0 when there is none).
pub fn len(path: &Path) -> io::Result<u64> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

pub fn truncate(path: &Path) -> io::Result<()> {
    match OpenOptions::new().write(true).truncate(true).open(path) {
        Ok(f) => f.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Rewrites a JSON-lines spool framed; returns how many records it kept, or
/// None when the file was not in the old format. The old file stays as it was
/// until the new one is complete and synced.
pub fn migrate_legacy<T: Serialize + DeserializeOwned>(path: &Path) -> io::Result<Option<u64>> {
    if format_of(path)? != Format::Legacy {
        return Ok(None);
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".framing");
    let tmp = PathBuf::from(tmp);
    let mut reader = match Reader::<T>::open(path, 0)? {
        Some(r) => r,
        None => return Ok(None),
    };
    let mut out = File::create(&tmp)?;
    let mut kept = 0u64;
    let mut buf = Vec::new();
    while let Some(r) = reader.next()? {
        encode(&r, &mut buf)?;
        kept += 1;
        if buf.len() >= READ_CHUNK {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    out.write_all(&buf)?;
    out.sync_all()?;
    drop(out);
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().filter(|d| !d.as_os_str().is_empty()))?;
    Ok(Some(kept))
}

/// Reads records in order from an offset (a frame boundary: 0, or an `offset()`
/// of an earlier reader of the same file), skipping what is damaged.
pub struct Reader<T> {
    file: File,
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts.
    start: usize,
    eof: bool,
    legacy: bool,
    /// The file offset of `buf[start]`.
    offset: u64,
    /// Damaged bytes being skipped (reported once the run of them ends).
    skipping: u64,
    /// Damaged bytes skipped so far.
    pub skipped: u64,
    _records: PhantomData<T>,
}

impl<T: DeserializeOwned> Reader<T> {
    /// None when there is no file.
    pub fn open(path: &Path, at: u64) -> io::Result<Option<Self>> {
        let mut file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut head = [0u8; 64];
        let n = file.read(&mut head)?;
        let legacy = format_of_head(&head[..n]) == Format::Legacy;
        file.seek(SeekFrom::Start(at))?;
        Ok(Some(Reader {
            file,
            buf: Vec::new(),
            start: 0,
            eof: false,
            legacy,
            offset: at,
            skipping: 0,
            skipped: 0,
            _records: PhantomData,
        }))
    }

    /// The offset just past the last record returned (or the damage skipped
    /// after it): where a later reader resumes.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Up to `n` records; fewer only at the end of the file.
    pub fn next_batch(&mut self, n: usize) -> io::Result<Vec<T>> {
        let mut out = Vec::with_capacity(n.min(1024));
        while out.len() < n {
            match self.next()? {
                Some(r) => out.push(r),
                None => break,
            }
        }
        Ok(out)
    }

    /// The next good record, or None at the end of the file.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> io::Result<Option<T>> {
        if self.legacy {
            self.next_line()
        } else {
            self.next_frame()
        }
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Reads until `n` bytes are available; false if the file ends first.
    fn fill(&mut self, n: usize) -> io::Result<bool> {
        while self.buf.len() - self.start < n {
            if self.eof {
                return Ok(false);
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let have = self.buf.len();
            let want = READ_CHUNK.max(n - have);
            self.buf.resize(have + want, 0);
            let got = loop {
                match self.file.read(&mut self.buf[have..]) {
                    Ok(g) => break g,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.buf.truncate(have);
                        return Err(e);
                    }
                }
            };
            self.buf.truncate(have + got);
            if got == 0 {
                self.eof = true;
            }
        }
        Ok(true)
    }

    /// Moves past `n` bytes that held a record.
    fn consume(&mut self, n: usize) {
        self.report_skipped();
        self.start += n;
        self.offset += n as u64;
    }

    /// Moves past `n` damaged bytes.
    fn skip(&mut self, n: usize) {
        self.start += n;
        self.offset += n as u64;
        self.skipping += n as u64;
        self.skipped += n as u64;
    }

    fn report_skipped(&mut self) {
        if self.skipping > 0 {
            tracing::warn!(
                bytes = self.skipping,
                at = self.offset - self.skipping,
                "ledger spool: skipped a damaged or torn record"
            );
            self.skipping = 0;
        }
    }

    fn next_frame(&mut self) -> io::Result<Option<T>> {
        loop {
            if !self.fill(HEADER_LEN)? {
                // A torn tail (a crash mid-append): nothing whole is left.
                let rest = self.available().len();
                self.skip(rest);
                self.report_skipped();
                return Ok(None);
            }
            let head = &self.available()[..HEADER_LEN];
            if head[..2] != MAGIC || head[2] != VERSION {
                // Resync: on to the next place a header could start.
                let next = self.available()[1..]
                    .windows(2)
                    .position(|w| w == MAGIC)
                    .map(|i| i + 1)
                    .unwrap_or(self.available().len() - 1);
                self.skip(next);
                continue;
            }
            let len_bytes = [head[3], head[4], head[5], head[6]];
            let crc = u32::from_le_bytes([head[7], head[8], head[9], head[10]]);
            let len = u32::from_le_bytes(len_bytes) as usize;
            if len > MAX_PAYLOAD || !self.fill(HEADER_LEN + len)? {
                // A length that is damage, or a frame the file ends inside of.
                self.skip(1);
                continue;
            }
            let payload = &self.available()[HEADER_LEN..HEADER_LEN + len];
            if checksum(VERSION, len_bytes, payload) != crc {
                self.skip(1);
                continue;
            }
            let parsed = serde_json::from_slice::<T>(payload);
            match parsed {
                Ok(r) => {
                    self.consume(HEADER_LEN + len);
                    return Ok(Some(r));
                }
                Err(e) => {
                    // Whole and intact, but not a record this version reads.
                    tracing::warn!(error = %e, at = self.offset, "ledger spool: skipping a record it cannot read");
                    self.skip(HEADER_LEN + len);
                }
            }
        }
    }

    fn next_line(&mut self) -> io::Result<Option<T>> {
        loop {
            let end = match self.available().iter().position(|&b| b == b'\n') {
                Some(i) => Some(i),
                None => {
                    let have = self.available().len();
                    if self.fill(have + 1)? {
                        continue;
                    }
                    // The last line, without its newline (torn, or just unterminated).
                    if have == 0 {
                        return Ok(None);
                    }
                    None
                }
            };
            let line_len = end.unwrap_or(self.available().len());
            let taken = line_len + usize::from(end.is_some());
            let line = &self.available()[..line_len];
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                self.consume(taken);
                continue;
            }
            match serde_json::from_slice::<T>(line) {
                Ok(r) => {
                    self.consume(taken);
                    return Ok(Some(r));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ledger spool: skipping an unreadable line");
                    self.skip(taken);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
    struct R {
        n: u64,
        text: String,
    }

    fn r(n: u64) -> R {
        R {
            n,
            text: format!("record {n} ŚÿĀ"),
        }
    }

    fn temp() -> PathBuf {
        std::env::temp_dir().join(format!("ragchat-spool-unit-{}", uuid::Uuid::new_v4().simple()))
    }

    fn frames(ns: &[u64]) -> Vec<u8> {
        let mut out = Vec::new();
        for &n in ns {
            encode(&r(n), &mut out).expect("encode");
        }
        out
    }

    fn read_all(path: &Path) -> Vec<u64> {
        let mut reader = Reader::<R>::open(path, 0).expect("open").expect("file");
        let mut out = Vec::new();
        while let Some(x) = reader.next().expect("read") {
            assert_eq!(x, r(x.n));
            out.push(x.n);
        }
        out
    }

    #[test]
    fn a_torn_last_frame_is_skipped_and_frames_appended_after_it_are_read() {
        let path = temp();
        append(&path, &frames(&[1, 2])).expect("append");
        // A crash in the middle of the next append: half a frame.
        let third = frames(&[3]);
        append(&path, &third[..third.len() / 2]).expect("torn append");
        assert_eq!(read_all(&path), [1, 2]);
        // Appending after the crash: the torn frame costs itself only.
        append(&path, &frames(&[4, 5])).expect("append after the crash");
        assert_eq!(read_all(&path), [1, 2, 4, 5]);
        // A tear inside the header too.
        append(&path, &frames(&[6])[..5]).expect("torn header");
        append(&path, &frames(&[7])).expect("append");
        assert_eq!(read_all(&path), [1, 2, 4, 5, 7]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_corrupted_record_in_the_middle_costs_only_itself() {
        let path = temp();
        let mut bytes = frames(&[1, 2, 3, 4, 5]);
        let one = frames(&[1]).len();
        // A flipped bit in the payload of record 2.
        bytes[one + HEADER_LEN + 10] ^= 0x08;
        // Record 4's length overwritten with something huge but plausible-looking.
        let four = 3 * one;
        bytes[four + 3..four + 7].copy_from_slice(&5000u32.to_le_bytes());
        std::fs::write(&path, &bytes).expect("write");
        let mut reader = Reader::<R>::open(&path, 0).expect("open").expect("file");
        let mut got = Vec::new();
        while let Some(x) = reader.next().expect("read") {
            got.push(x.n);
        }
        assert_eq!(got, [1, 3, 5]);
        assert_eq!(reader.skipped as usize, 2 * one);
        assert_eq!(reader.offset() as usize, bytes.len());
        // Garbage between frames (and a stray header byte) is skipped too.
        let mut noisy = frames(&[1]);
        noisy.extend_from_slice(b"\xFFgarbage\xFF\x5A\x01junk");
        noisy.extend(frames(&[2]));
        std::fs::write(&path, &noisy).expect("write");
        assert_eq!(read_all(&path), [1, 2]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_reader_resumes_at_the_offset_of_an_earlier_one() {
        let path = temp();
        append(&path, &frames(&[1, 2, 3, 4, 5])).expect("append");
        let mut first = Reader::<R>::open(&path, 0).expect("open").expect("file");
        let two: Vec<u64> = first.next_batch(2).expect("read").iter().map(|x| x.n).collect();
        assert_eq!(two, [1, 2]);
        let mut second = Reader::<R>::open(&path, first.offset()).expect("open").expect("file");
        let rest: Vec<u64> = second.next_batch(10).expect("read").iter().map(|x| x.n).collect();
        assert_eq!(rest, [3, 4, 5]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn an_old_json_lines_spool_is_read_then_rewritten_framed() {
        let path = temp();
        let mut old = String::new();
        for n in [1, 2, 3] {
            old.push_str(&serde_json::to_string(&r(n)).expect("json"));
            old.push('\n');
        }
        // The old writer's torn line (ended by the next append) and a final one.
        let torn = serde_json::to_string(&r(9)).expect("json");
        old.push_str(&torn[..torn.len() / 2]);
        old.push('\n');
        old.push_str(&serde_json::to_string(&r(4)).expect("json"));
        old.push('\n');
        std::fs::write(&path, &old).expect("write");
        assert_eq!(format_of(&path).expect("format"), Format::Legacy);
        assert_eq!(read_all(&path), [1, 2, 3, 4], "read as it is");

        assert_eq!(migrate_legacy::<R>(&path).expect("migrate"), Some(4));
        assert_eq!(format_of(&path).expect("format"), Format::Framed);
        assert_eq!(read_all(&path), [1, 2, 3, 4], "the same records, framed");
        assert_eq!(migrate_legacy::<R>(&path).expect("again"), None, "once");
        append(&path, &frames(&[5])).expect("append");
        assert_eq!(read_all(&path), [1, 2, 3, 4, 5]);
        let _ = std::fs::remove_file(&path);
    }
}
