//! Where lines go: per-worker buffers written out in one `write` each, to a file opened for
//! appending (reopened for logrotate) or to stdout.

use super::{Facts, Format, FLUSH_AT};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where lines go: `access_log = "off"`, `"stdout"` or a file's path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Target {
    #[default]
    Off,
    Stdout,
    File(PathBuf),
}

impl Target {
    /// `"off"`, `"stdout"`, or a path (not opened here).
    pub fn parse(s: &str) -> Result<Target, String> {
        Ok(match s {
            "off" => Target::Off,
            "stdout" => Target::Stdout,
            "" => return Err("expected a path, \"stdout\" or \"off\"".into()),
            path => Target::File(PathBuf::from(path)),
        })
    }
}

/// What every writer of one log shares: the open file, and what went wrong.
#[derive(Debug)]
struct Sink {
    target: Target,
    /// `None` only when off. Writes hold the lock, so one flush's bytes are never split by
    /// another's, even on a pipe where a large write may go out in parts.
    file: Mutex<Option<File>>,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Sink {
    fn failed(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
    }
}

fn open_append(path: &std::path::Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_APPEND: every write lands at the end, whoever else appends (logrotate's
    // copytruncate, another process); created 0644 as nginx's logs are (less the umask).
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
}

/// An access log's buffered writer: one per worker thread (made with [`Writer::another`]),
/// all sharing one destination. Lines collect in the writer's own buffer and go out in one
/// `write` when it passes [`FLUSH_AT`] or on [`Writer::flush`], so lines from different
/// workers never interleave. Writes are blocking (a regular file's write is a copy into the
/// page cache, as nginx's are). Write errors are counted ([`Writer::errors`]), never raised:
/// the lines of a failed write are dropped. Dropping a writer flushes it.
#[derive(Debug)]
pub struct Writer {
    sink: Arc<Sink>,
    buf: Vec<u8>,
    /// `luaproxy.test`: each line goes to the kit's log capture instead of the sink.
    capture: bool,
}

impl Writer {
    /// Opens the destination (a file is created if missing, appended to); the error is one
    /// line naming the path, for start-up.
    pub fn open(target: &Target) -> Result<Writer, String> {
        let file = match target {
            Target::Off => None,
            Target::Stdout => {
                // A duplicate of fd 1, written as a plain file: std's `Stdout` is
                // line-buffered and would split a flush into one write per line.
                use std::os::fd::AsFd;
                let fd = std::io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| format!("access_log 'stdout': {e}"))?;
                Some(File::from(fd))
            }
            Target::File(p) => {
                Some(open_append(p).map_err(|e| format!("access_log '{}': {e}", p.display()))?)
            }
        };
        Ok(Writer {
            sink: Arc::new(Sink {
                target: target.clone(),
                file: Mutex::new(file),
                errors: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
            buf: Vec::new(),
            capture: false,
        })
    }

    /// For `luaproxy.test`: a writer for `target` that opens nothing and hands every line to
    /// the log capture of the thread that writes it (`log::capture_access`).
    pub fn capture(target: Target) -> Writer {
        Writer {
            sink: Arc::new(Sink {
                target,
                file: Mutex::new(None),
                errors: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
            buf: Vec::new(),
            capture: true,
        }
    }

    /// A writer to the same destination with its own buffer (one per worker thread).
    pub fn another(&self) -> Writer {
        Writer {
            sink: self.sink.clone(),
            buf: Vec::new(),
            capture: self.capture,
        }
    }

    /// Where this writer's lines go.
    pub fn target(&self) -> &Target {
        &self.sink.target
    }

    /// True for `access_log = "off"`: the caller need not gather anything.
    pub fn is_off(&self) -> bool {
        self.sink.target == Target::Off
    }

    /// Renders one line into the buffer, and writes the buffer out once it passes
    /// [`FLUSH_AT`]. Nothing when off.
    pub fn log(&mut self, fmt: &Format, facts: &Facts) {
        if self.is_off() {
            return;
        }
        if self.buf.capacity() == 0 {
            // Room for a whole buffer and the line that crosses the mark: no regrowth.
            self.buf.reserve(FLUSH_AT + 4096);
        }
        fmt.render(facts, &mut self.buf);
        if self.capture {
            let line = String::from_utf8_lossy(&self.buf);
            crate::log::capture_access(line.trim_end_matches('\n'));
            self.buf.clear();
            return;
        }
        if self.buf.len() >= FLUSH_AT {
            self.flush();
        }
    }

    /// Bytes waiting in this writer's buffer.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Writes the buffered lines out in one `write` (more only if the kernel takes part of
    /// it). On an error they are dropped and the error counted.
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut file = self.sink.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = file.as_mut() {
            if let Err(e) = f.write_all(&self.buf) {
                drop(file);
                self.sink.failed(format!("{}: {e}", self.describe()));
            }
        }
        self.buf.clear();
        // A huge line (a large ctx value) should not pin its memory for the worker's life.
        if self.buf.capacity() > 4 * FLUSH_AT {
            self.buf.shrink_to(FLUSH_AT + 4096);
        }
    }

    /// Opens the file's path again, for every writer of this log (logrotate renamed the file
    /// and sends SIGUSR1). Lines still in writers' buffers go to the new file. On an error
    /// the old file stays in use, and the error is counted and returned. Nothing to do for
    /// stdout or off.
    pub fn reopen(&self) -> Result<(), String> {
        let Target::File(p) = &self.sink.target else {
            return Ok(());
        };
        match open_append(p) {
            Ok(new) => {
                // The old file closes after the lock is let go: no writer waits on its close.
                let old = self
                    .sink
                    .file
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .replace(new);
                drop(old);
                Ok(())
            }
            Err(e) => {
                let msg = format!("{}: cannot reopen: {e}", self.describe());
                self.sink.failed(msg.clone());
                Err(msg)
            }
        }
    }

    /// Failed writes and reopens so far, by any writer of this log.
    pub fn errors(&self) -> u64 {
        self.sink.errors.load(Ordering::Relaxed)
    }

    /// The last failure's message (`access_log '/path': ...`), if any.
    pub fn last_error(&self) -> Option<String> {
        self.sink
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn describe(&self) -> String {
        match &self.sink.target {
            Target::File(p) => format!("access_log '{}'", p.display()),
            Target::Stdout => "access_log 'stdout'".into(),
            Target::Off => "access_log 'off'".into(),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn targets() {
        assert_eq!(Target::parse("off"), Ok(Target::Off));
        assert_eq!(Target::parse("stdout"), Ok(Target::Stdout));
        assert_eq!(
            Target::parse("/var/log/a.log"),
            Ok(Target::File("/var/log/a.log".into()))
        );
        assert!(Target::parse("").is_err());
        let mut off = Writer::open(&Target::Off).unwrap();
        assert!(off.is_off());
        off.log(&Format::default(), &Facts::default());
        assert_eq!(off.pending(), 0);
        assert!(!Writer::open(&Target::Stdout).unwrap().is_off());
        let e = Writer::open(&Target::File("/nonexistent-dir/a.log".into())).unwrap_err();
        assert!(
            e.starts_with("access_log '/nonexistent-dir/a.log': "),
            "{e}"
        );
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("luaproxy-accesslog-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn read(p: &Path) -> String {
        String::from_utf8(std::fs::read(p).unwrap_or_default()).unwrap()
    }

    #[test]
    fn workers_append_whole_lines() {
        let dir = temp_dir("threads");
        let path = dir.join("access.log");
        std::fs::write(&path, "before\n").unwrap();
        let fmt = Arc::new(Format::parse("$request_id $uri").unwrap());
        let first = Writer::open(&Target::File(path.clone())).unwrap();
        const LINES: usize = 5000;
        let threads: Vec<_> = [b'a', b'b']
            .into_iter()
            .map(|c| {
                let mut w = first.another();
                let fmt = fmt.clone();
                std::thread::spawn(move || {
                    let uri = String::from_utf8(vec![c; 300]).unwrap();
                    for i in 0..LINES {
                        let id = format!("{}{i}", c as char);
                        let f = Facts {
                            request_id: &id,
                            uri: &uri,
                            ..Default::default()
                        };
                        w.log(&fmt, &f);
                        if i % 777 == 0 {
                            w.flush();
                        }
                    }
                    // Dropping the writer flushes the rest.
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(first);
        let text = read(&path);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("before"), "appended, not truncated");
        let mut next = [0usize; 2];
        for l in lines {
            let (id, uri) = l.split_once(' ').expect(l);
            let c = id.as_bytes()[0];
            let k = usize::from(c - b'a');
            assert_eq!(id[1..].parse::<usize>().unwrap(), next[k], "{l}");
            assert!(uri.len() == 300 && uri.bytes().all(|b| b == c), "{l}");
            next[k] += 1;
        }
        assert_eq!(next, [LINES, LINES]);
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::remove_file(&path);
        let w = Writer::open(&Target::File(path.clone())).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o644, 0, "created at most 0644: {mode:o}");
        assert_eq!(w.errors(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reopen_after_rename() {
        let dir = temp_dir("reopen");
        let path = dir.join("access.log");
        let fmt = Format::parse("$request_id").unwrap();
        let mut w1 = Writer::open(&Target::File(path.clone())).unwrap();
        let mut w2 = w1.another();
        let log = |w: &mut Writer, id: &str| {
            w.log(
                &fmt,
                &Facts {
                    request_id: id,
                    ..Default::default()
                },
            );
            w.flush();
        };
        log(&mut w1, "one");
        std::fs::rename(&path, dir.join("access.log.1")).unwrap();
        // Until the reopen, lines follow the renamed file (as logrotate expects).
        log(&mut w2, "two");
        w2.log(
            &fmt,
            &Facts {
                request_id: "buffered",
                ..Default::default()
            },
        );
        w1.reopen().unwrap();
        // Every writer of the log moved, buffered lines included.
        log(&mut w2, "three");
        log(&mut w1, "four");
        assert_eq!(read(&dir.join("access.log.1")), "one\ntwo\n");
        assert_eq!(read(&path), "buffered\nthree\nfour\n");
        // A reopen that fails keeps the old file and counts the error.
        std::fs::remove_dir_all(&dir).unwrap();
        let e = w1.reopen().unwrap_err();
        assert!(e.contains("cannot reopen"), "{e}");
        assert_eq!(w1.errors(), 1);
        assert_eq!(w2.last_error(), Some(e));
        log(&mut w1, "five");
        assert_eq!(w1.errors(), 1, "the old (unlinked) file still takes lines");
        // Nothing to reopen for stdout or off.
        Writer::open(&Target::Stdout).unwrap().reopen().unwrap();
        Writer::open(&Target::Off).unwrap().reopen().unwrap();
    }

    #[test]
    fn a_full_buffer_is_written_at_once() {
        let dir = temp_dir("flush");
        let path = dir.join("access.log");
        let fmt = Format::parse("$uri").unwrap();
        let mut w = Writer::open(&Target::File(path.clone())).unwrap();
        let uri = "u".repeat(1023); // 1 KiB lines with the newline
        let f = Facts {
            uri: &uri,
            ..Default::default()
        };
        for _ in 0..FLUSH_AT / 1024 - 1 {
            w.log(&fmt, &f);
        }
        assert_eq!(w.pending(), FLUSH_AT - 1024);
        assert_eq!(read(&path).len(), 0, "nothing written below the mark");
        w.log(&fmt, &f);
        assert_eq!(w.pending(), 0);
        assert_eq!(read(&path).len(), FLUSH_AT);
        w.log(&fmt, &f);
        assert_eq!(read(&path).len(), FLUSH_AT);
        w.flush();
        assert_eq!(read(&path).len(), FLUSH_AT + 1024);
        w.flush(); // an empty flush writes nothing
        assert_eq!(read(&path).len(), FLUSH_AT + 1024);
        assert_eq!(w.errors(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_errors_are_counted_not_raised() {
        if !Path::new("/dev/full").exists() {
            return;
        }
        let mut w = Writer::open(&Target::File("/dev/full".into())).unwrap();
        w.log(&Format::default(), &Facts::default());
        w.flush();
        assert_eq!(w.errors(), 1);
        assert_eq!(w.pending(), 0, "the failed lines are dropped");
        let e = w.last_error().unwrap();
        assert!(e.starts_with("access_log '/dev/full': "), "{e}");
    }
}
