//! Where the processed position is kept between runs. A saved cursor `C` means: every event
//! with `time_us <= C` has been finished by the handler. A run resumes with `cursor=C` (the
//! server's cursor is inclusive) and drops the repeat of `C` itself.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Keeps the cursor. `save` is called from the processing task, at most every save interval
/// and once at shutdown; it should be durable when it returns. It runs on that task (a
/// blocking call on the async runtime's thread): [`FileCursorStore`]'s two syncs take a few
/// milliseconds, once a second by default, but after every event with a zero save interval;
/// a store that writes to a database may do it in the handler's own transaction instead.
pub trait CursorStore: Send + 'static {
    fn load(&self) -> std::io::Result<Option<u64>>;
    fn save(&mut self, cursor: u64) -> std::io::Result<()>;
}

/// A cursor in a small text file (the decimal `time_us` and a newline), replaced atomically:
/// written to a temporary file beside it (`<file>.tmp.<pid>.<random>`, left behind only by a
/// crash between the two), synced, renamed over, and the directory synced, so a crash leaves
/// the old cursor or the new one, never a torn one.
#[derive(Debug, Clone)]
pub struct FileCursorStore {
    path: PathBuf,
}

impl FileCursorStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileCursorStore { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl CursorStore for FileCursorStore {
    fn load(&self) -> std::io::Result<Option<u64>> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) => s.trim().parse::<u64>().map(Some).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "{}: not a cursor ({e}): {:?}",
                        self.path.display(),
                        s.chars().take(40).collect::<String>()
                    ),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn save(&mut self, cursor: u64) -> std::io::Result<()> {
        let (tmp, mut f) = create_temporary(&self.path)?;
        let written = (|| {
            writeln!(f, "{cursor}")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        sync_dir_of(&self.path)
    }
}

/// A new temporary file beside `path`, of a name of its own: two writers of one path
/// (overlapping deploys, two runners given the same file) never write into each other's file,
/// so what is renamed over the cursor is always a whole one. The name is random, not counted:
/// a process restarted under the same pid (a container's PID 1) must not meet the names a
/// crashed one left behind; a name taken is skipped, never removed (it is not ours).
fn create_temporary(path: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    for _ in 0..16 {
        let mut tmp = path.to_path_buf().into_os_string();
        tmp.push(format!(".tmp.{}.{:016x}", std::process::id(), rand::random::<u64>()));
        let tmp = PathBuf::from(tmp);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "no free temporary name beside the cursor"))
}

/// Makes a rename into `path`'s directory durable: on Unix by syncing the directory. Windows
/// cannot open a directory as a file (the save failed there after its rename); NTFS journals
/// the rename itself.
#[cfg(unix)]
fn sync_dir_of(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir_of(_: &Path) -> std::io::Result<()> {
    Ok(())
}

/// A cursor in memory, shared by its clones (tests, or a process that keeps the cursor with
/// its own data and reads it from here).
#[derive(Debug, Clone, Default)]
pub struct MemoryCursorStore {
    // 0 = none (no event has time_us 0).
    cursor: Arc<AtomicU64>,
}

impl MemoryCursorStore {
    pub fn new(cursor: Option<u64>) -> Self {
        MemoryCursorStore { cursor: Arc::new(AtomicU64::new(cursor.unwrap_or(0))) }
    }

    pub fn get(&self) -> Option<u64> {
        Some(self.cursor.load(Ordering::Acquire)).filter(|&c| c > 0)
    }
}

impl CursorStore for MemoryCursorStore {
    fn load(&self) -> std::io::Result<Option<u64>> {
        Ok(self.get())
    }

    fn save(&mut self, cursor: u64) -> std::io::Result<()> {
        self.cursor.store(cursor, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_store_round_trips_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileCursorStore::new(dir.path().join("cursor"));
        assert_eq!(s.load().unwrap(), None);
        s.save(1725911162329308).unwrap();
        assert_eq!(s.load().unwrap(), Some(1725911162329308));
        s.save(1725911162329309).unwrap();
        assert_eq!(FileCursorStore::new(s.path()).load().unwrap(), Some(1725911162329309));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
        std::fs::write(s.path(), "twelve").unwrap();
        let e = s.load().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("not a cursor"), "{e}");
    }

    /// Two writers of one path (overlapping deploys): every save and every load succeeds, and
    /// what is read is always a whole cursor.
    #[test]
    fn two_writers_of_one_file_never_leave_a_torn_or_empty_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cursor");
        FileCursorStore::new(&path).save(1).unwrap();
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let mut s = FileCursorStore::new(&path);
                std::thread::spawn(move || (0..300u64).try_for_each(|i| s.save(1_000 + 2 * i + w)))
            })
            .collect();
        let reader = FileCursorStore::new(&path);
        while !writers.iter().all(|w| w.is_finished()) {
            assert!(reader.load().unwrap().is_some());
        }
        for w in writers {
            w.join().unwrap().unwrap();
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }

    /// Temporary files a crashed run left (a crash between writing one and renaming it) under
    /// the names this process might pick — a container's PID 1 is the same pid at every start —
    /// neither fail a save nor are taken away: they are not this save's.
    #[test]
    fn temporary_files_a_crash_left_do_not_fail_the_saves_of_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cursor");
        let left: Vec<PathBuf> =
            (0..2_000).map(|n| dir.path().join(format!("cursor.tmp.{}.{n}", std::process::id()))).collect();
        for f in &left {
            std::fs::write(f, "1\n").unwrap();
        }
        let mut s = FileCursorStore::new(&path);
        for i in 0..100 {
            s.save(1_000 + i).unwrap();
        }
        assert_eq!(s.load().unwrap(), Some(1_099));
        assert!(left.iter().all(|f| f.exists()), "another's temporary file was removed");
    }

    #[test]
    fn memory_store_is_shared_by_clones() {
        let a = MemoryCursorStore::new(None);
        let mut b = a.clone();
        b.save(7).unwrap();
        assert_eq!(a.load().unwrap(), Some(7));
    }
}
