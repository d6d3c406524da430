//! Log lines to stderr in batches: an event appends its line to a buffer, and a flusher
//! thread writes the buffer with one write(2) every 100 ms, or sooner once it passes
//! 16 KiB, and at exit. Two log lines per connection written one syscall each cost the gate
//! a tenth of its connect rate.
//!
//! Bounded, and never waited on: only the flusher thread writes, so a stderr that stops
//! accepting (a pipe nobody reads) blocks that thread alone; lines past 1 MiB are then
//! dropped and counted rather than buffered, and the exit's last flush waits a bounded time.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard, OnceLock};
use std::thread::Thread;
use std::time::Duration;

const FLUSH_AT: usize = 16 * 1024;
const CAP: usize = 1024 * 1024;
const EVERY: Duration = Duration::from_millis(100);

pub struct Batched {
    lines: Mutex<Vec<u8>>,
    /// Held while writing, so that batches reach stderr in order.
    writing: Mutex<()>,
    dropped: AtomicU64,
    /// The flusher thread, woken when the buffer passes [`FLUSH_AT`].
    flusher: Option<Thread>,
}

static GLOBAL: OnceLock<Batched> = OnceLock::new();

impl Batched {
    /// The process's stderr batcher; the first call starts its flusher thread.
    pub fn stderr() -> &'static Batched {
        GLOBAL.get_or_init(|| {
            let flusher = std::thread::Builder::new()
                .name("wsgate-log".into())
                .spawn(|| loop {
                    std::thread::park_timeout(EVERY);
                    Batched::stderr().flush();
                })
                .ok()
                .map(|handle| handle.thread().clone());
            Batched {
                lines: Mutex::new(Vec::with_capacity(FLUSH_AT * 2)),
                writing: Mutex::new(()),
                dropped: AtomicU64::new(0),
                flusher,
            }
        })
    }

    /// Writes out what is buffered; waits for a write already under way.
    pub fn flush(&self) {
        let guard = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = self.write_out(guard);
        // Told as an event of its own, in the log's format (a JSON collector reads every
        // line), once stderr has taken what was held before those lines: it goes out with
        // the next batch.
        if dropped > 0 {
            tracing::warn!(dropped, "log lines dropped: stderr was not accepting them");
        }
    }

    /// Writes out what is buffered, waiting at most `within` for stderr to take it (the
    /// exit's last flush: a pipe nobody reads must not hold the process).
    pub fn flush_within(&'static self, within: Duration) {
        let (done, finished) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("wsgate-log-exit".into())
            .spawn(move || {
                self.flush();
                let _ = done.send(());
            });
        if spawned.is_ok() {
            let _ = finished.recv_timeout(within);
        }
    }

    /// Writes out the batch; returns how many lines were dropped before it was taken.
    fn write_out(&self, _writing: MutexGuard<'_, ()>) -> u64 {
        let batch = std::mem::take(&mut *self.lock());
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        let mut err = io::stderr().lock();
        if !batch.is_empty() {
            let _ = err.write_all(&batch);
        }
        let _ = err.flush();
        // Keep the allocation for the next batch when it is the usual size.
        if batch.capacity() <= FLUSH_AT * 2 {
            let mut lines = self.lock();
            if lines.is_empty() {
                let mut batch = batch;
                batch.clear();
                *lines = batch;
            }
        }
        dropped
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append(&self, line: &[u8]) {
        let full = {
            let mut lines = self.lock();
            if lines.len() + line.len() > CAP {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let was_below = lines.len() < FLUSH_AT;
            lines.extend_from_slice(line);
            was_below && lines.len() >= FLUSH_AT
        };
        // Wake the flusher once as the buffer passes the mark; the event loop never writes.
        if full {
            match &self.flusher {
                Some(flusher) => flusher.unpark(),
                // No thread could be started: write here, as the only way lines get out.
                None => self.flush(),
            }
        }
    }
}

/// What tracing-subscriber's fmt layer writes each formatted event into.
pub struct Line(&'static Batched);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for &'static Batched {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(self)
    }
}

/// The lines' timestamp, as tracing's own (`2026-12-02T00:07:00.123456Z`, UTC), with its
/// date and time of day formatted once a second per thread and the microseconds added:
/// one write per line instead of a dozen small ones into a growing string.
pub struct Timestamp;

impl tracing_subscriber::fmt::time::FormatTime for Timestamp {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        use std::cell::RefCell;
        use std::time::{SystemTime, UNIX_EPOCH};
        thread_local! {
            static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
        }
        let now = SystemTime::now();
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        SECOND.with(|cell| {
            let mut second = cell.borrow_mut();
            if second.0 != since.as_secs() {
                let mut whole = String::with_capacity(32);
                tracing_subscriber::fmt::time::SystemTime.format_time(
                    &mut tracing_subscriber::fmt::format::Writer::new(&mut whole),
                )?;
                // Everything before the fraction.
                whole.truncate(whole.find('.').unwrap_or(whole.len()));
                *second = (since.as_secs(), whole);
            }
            let mut line = [0u8; 40];
            let prefix = second.1.as_bytes();
            let n = prefix.len().min(32);
            line[..n].copy_from_slice(&prefix[..n]);
            let mut micros = since.subsec_micros();
            line[n] = b'.';
            for i in (0..6).rev() {
                line[n + 1 + i] = b'0' + (micros % 10) as u8;
                micros /= 10;
            }
            line[n + 7] = b'Z';
            w.write_str(std::str::from_utf8(&line[..n + 8]).map_err(|_| std::fmt::Error)?)
        })
    }
}

#[cfg(test)]
mod timestamp_tests {
    use super::*;
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::FormatTime;

    /// The same text as tracing's own timer, to the second, with six fraction digits.
    #[test]
    fn timestamps_read_as_tracings_own() {
        let (mut ours, mut theirs) = (String::new(), String::new());
        Timestamp.format_time(&mut Writer::new(&mut ours)).unwrap();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut theirs))
            .unwrap();
        assert_eq!(ours.len(), theirs.len(), "{ours} / {theirs}");
        assert_eq!(ours.len(), 27, "{ours}");
        assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
        // The same second (unless one fell on each side of a second's end).
        let second = |s: &str| s[..19].to_owned();
        if second(&ours) != second(&theirs) {
            let mut again = String::new();
            Timestamp.format_time(&mut Writer::new(&mut again)).unwrap();
            assert_eq!(second(&again)[..16], second(&theirs)[..16]);
        }
    }
}
