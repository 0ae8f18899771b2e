//! Runs the real `contrail` binary and talks to it over loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_contrail")
}

/// A running `contrail serve`.
pub struct Serve {
    pub child: Child,
    pub public: SocketAddr,
    pub metrics: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Serve {
    /// Starts `contrail serve` on loopback with free ports; `extra` are more flags.
    ///
    /// A restart on a fixed `--listen` address is tried again for a few seconds while the port
    /// is taken: once the old process is gone, any socket of a test running beside this one may
    /// be given that free port for a while.
    pub fn start(data_dir: &Path, relay_url: &str, extra: &[&str]) -> Serve {
        Serve::start_limited(data_dir, relay_url, extra, None)
    }

    /// [`Serve::start`], the process started with these soft and hard limits on open files.
    pub fn start_limited(data_dir: &Path, relay_url: &str, extra: &[&str], open_files: Option<(u64, u64)>) -> Serve {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Serve::try_start(data_dir, relay_url, extra, open_files) {
                Ok(serve) => return serve,
                Err(logs)
                    if gives(extra, "--listen")
                        && logs.contains("Address already in use")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(logs) => panic!("contrail serve did not start; logs:\n{logs}"),
            }
        }
    }

    /// [`Serve::start`] once; the logs when it did not start.
    fn try_start(
        data_dir: &Path,
        relay_url: &str,
        extra: &[&str],
        open_files: Option<(u64, u64)>,
    ) -> Result<Serve, String> {
        let mut cmd = Command::new(bin());
        if let Some((soft, hard)) = open_files {
            use std::os::unix::process::CommandExt;
            let limit = rustix::process::Rlimit { current: Some(soft), maximum: Some(hard) };
            // Safety: only a system call (no allocation, no lock) between fork and exec.
            unsafe {
                cmd.pre_exec(move || Ok(rustix::process::setrlimit(rustix::process::Resource::Nofile, limit)?));
            }
        }
        cmd.arg("serve");
        if !gives(extra, "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(["--metrics-listen", "127.0.0.1:0", "--relay-url", relay_url])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--sync-writes", "false"]);
        // Short waits between relay connections, unless the test sets its own.
        if !gives(extra, "--relay-backoff-min") {
            cmd.args(["--relay-backoff-min", "50ms", "--relay-backoff-max", "200ms"]);
        }
        cmd.args(extra).env("RUST_LOG", "info").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("contrail starts");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let l2 = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"] == "listening" {
                        let _ = tx.send((
                            v["listener"].as_str().unwrap_or("").to_string(),
                            v["addr"].as_str().unwrap_or("").to_string(),
                        ));
                    }
                }
                l2.lock().unwrap().push(line);
            }
        });
        let (mut public, mut metrics) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while public.is_none() || metrics.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((name, addr)) if name == "public" => public = addr.parse().ok(),
                Ok((name, addr)) if name == "metrics" => metrics = addr.parse().ok(),
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let logs = logs.lock().unwrap().join("\n");
                    return Err(logs);
                }
            }
        }
        Ok(Serve { child, public: public.unwrap(), metrics: metrics.unwrap(), logs })
    }

    /// The value of a metric line (first match of `name` with optional labels).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_get(self.metrics, "/metrics").ok()?;
        metric_value(&body, name)
    }

    /// Waits until `contrail_relay_last_seq` reaches `seq`.
    /// Waits until the relay seq is exactly `seq`: after a relay reset, when "at least" was
    /// already true of the old, higher seq space.
    pub fn wait_for_seq_exactly(&self, seq: i64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.metric("contrail_relay_last_seq").map(|v| v as i64) != Some(seq) {
            assert!(
                Instant::now() < deadline,
                "relay seq {seq} not reached (at {:?}); logs:\n{}",
                self.metric("contrail_relay_last_seq"),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_for_seq(&self, seq: i64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.metric("contrail_relay_last_seq").is_some_and(|v| v as i64 >= seq) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "relay seq {seq} not reached (at {:?}); logs:\n{}",
                    self.metric("contrail_relay_last_seq"),
                    self.logs.lock().unwrap().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc_kill(self.child.id() as i32, 15) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!("contrail did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` to a process (2 = SIGINT, 15 = SIGTERM).
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: sending a signal to a child process of this test.
    unsafe { libc_kill(pid as i32, sig) };
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub fn metric_value(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A minimal HTTP/1.1 GET over loopback: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_get_with(addr, path, &[])
}

pub fn http_get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// `contrail inspect log` lines.
pub fn inspect_log(data_dir: &Path) -> Vec<String> {
    let out = Command::new(bin()).args(["inspect", "log", "--data-dir"]).arg(data_dir).output().unwrap();
    assert!(out.status.success(), "inspect log failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect()
}

pub fn inspect_stats(data_dir: &Path) -> serde_json::Value {
    let out = Command::new(bin()).args(["inspect", "stats", "--data-dir"]).arg(data_dir).output().unwrap();
    assert!(out.status.success(), "inspect stats failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Whether `extra` sets `flag`, as `--flag value` or `--flag=value`.
fn gives(extra: &[&str], flag: &str) -> bool {
    extra.iter().any(|a| a.strip_prefix(flag).is_some_and(|rest| rest.is_empty() || rest.starts_with('=')))
}
