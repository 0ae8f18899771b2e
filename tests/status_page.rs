//! The status page in a real headless browser (Debian's Chromium, installed by
//! `scripts/deps --test`): during a paced run with subscribers, the page renders, every chart
//! has data, the page reports no script errors, and a screenshot is kept as a test artifact.

mod common;

use common::client::connect;
use common::frames::generate;
use common::process::{http_get, Serve};
use common::relay::{FakeRelay, Faults};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn chromium() -> Option<PathBuf> {
    let candidates = [std::env::var_os("CHROMIUM").map(PathBuf::from), Some("/usr/bin/chromium".into())];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// Runs headless Chromium on `url` with `args`; (stdout, stderr).
fn browse(chromium: &std::path::Path, url: &str, args: &[&str]) -> (String, String) {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            // Let the page's timers run a few rounds (virtual time; fetches are real).
            "--virtual-time-budget=6000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Replaces the body's `time` (the generator's fixed 2026-07-04 string; records' `createdAt`
/// keys are left alone, so their CIDs still hold) with `time`, which has the same length.
fn with_relay_time(mut frame: Vec<u8>, time: &str) -> Vec<u8> {
    let mut old = b"\x64time\x78\x18".to_vec();
    old.extend_from_slice(common::frames::TIME.as_bytes());
    assert_eq!(time.len(), common::frames::TIME.len());
    if let Some(at) = frame.windows(old.len()).position(|w| w == old) {
        frame[at + 7..at + old.len()].copy_from_slice(time.as_bytes());
    }
    frame
}

/// The value of `attr` in the first element whose `id` is `id`, in serialised HTML.
fn attr_of(dom: &str, id: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let tag_start = dom[..at].rfind('<')?;
    let tag = &dom[tag_start..tag_start + dom[tag_start..].find('>')?];
    let key = format!("{attr}=\"");
    let v = tag.find(&key)? + key.len();
    Some(tag[v..v + tag[v..].find('"')?].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_draws_the_last_hour_in_a_real_browser() {
    let Some(chromium) = chromium() else {
        eprintln!("SKIP the_status_page_draws_the_last_hour_in_a_real_browser: no chromium (run scripts/deps --test)");
        return;
    };
    let relay = FakeRelay::start().await;
    // Frames whose relay `time` is about now, so the lag chart shows a live relay.
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    for g in generate(1, 30_000, 200, 51) {
        relay.push(g.seq, with_relay_time(g.frame, &now));
    }
    // A paced firehose for the whole test (~1,000 frames/s).
    relay.set_faults(Faults { frame_interval: Some(Duration::from_millis(5)), burst: 5, ..Faults::default() });
    let dir = tempfile::tempdir().unwrap();
    let serve = Serve::start(
        dir.path(),
        &relay.url(),
        &["--status-sample-interval", "300ms", "--max-events-per-second-per-ip", "0"],
    );
    // Subscribers of both compressions, reading in the background.
    let mut readers = Vec::new();
    for q in ["/subscribe", "/subscribe?compress=true", "/subscribe?wantedCollections=app.bsky.feed.post"] {
        let mut ws = connect(serve.public, q, &[]).await.unwrap();
        readers.push(tokio::spawn(async move {
            while common::client::next(&mut ws, Duration::from_secs(30)).await.is_some() {}
        }));
    }
    // Wait for a few samples with traffic in them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http_get(serve.public, "/status/history").unwrap();
        let samples: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        let busy = samples.iter().filter(|s| s["ingest_per_second"].as_f64().unwrap_or(0.0) > 0.0).count();
        if samples.len() >= 8 && busy >= 4 {
            assert!(samples.last().unwrap()["subscribers"]["v1"]["zstd"].as_i64().unwrap() >= 1);
            break;
        }
        assert!(Instant::now() < deadline, "history did not fill: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, status) = http_get(serve.public, "/status").unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert!(status["mix"]["kinds"]["commit"].as_u64().unwrap() > 0, "{status}");
    assert!(!status["mix"]["top_collections"].as_array().unwrap().is_empty(), "{status}");

    let url = format!("http://{}/", serve.public);
    let chromium2 = chromium.clone();
    let url2 = url.clone();
    let (dom, log) = tokio::task::spawn_blocking(move || browse(&chromium2, &url2, &["--dump-dom"])).await.unwrap();
    assert!(dom.contains("<h1>Contrail</h1>"), "the page did not render:\n{log}");
    for chart in ["c-ingest", "c-delivered", "c-lag", "c-subs", "c-drops", "c-span"] {
        let points: usize = attr_of(&dom, chart, "data-points").unwrap_or_default().parse().unwrap_or(0);
        assert!(points >= 2, "chart {chart} has {points} points");
    }
    assert!(dom.contains("class=\"series\""), "no chart lines drawn");
    assert!(dom.contains("app.bsky.feed."), "the event mix is empty");
    let errors = dom.split("id=\"errors\"").nth(1).and_then(|s| s.split("</div>").next()).unwrap_or("");
    assert!(errors.trim_start_matches(" hidden=\"\">").trim().is_empty(), "script errors on the page: {errors}");
    assert!(!log.contains("Uncaught"), "console errors:\n{log}");

    // The screenshot, kept with the test's build artifacts.
    let png = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let shot = format!("--screenshot={}", png.display());
    let (_, log) = tokio::task::spawn_blocking(move || browse(&chromium, &url, &[&shot, "--window-size=1280,1400"]))
        .await
        .unwrap();
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(size > 20_000, "screenshot missing or blank ({size} bytes):\n{log}");
    eprintln!("status page screenshot: {}", png.display());
    // For the README: CONTRAIL_STATUS_SCREENSHOT=docs/status-page.png cargo test --test status_page
    if let Some(copy) = std::env::var_os("CONTRAIL_STATUS_SCREENSHOT") {
        std::fs::copy(&png, copy).unwrap();
    }
    for r in readers {
        r.abort();
    }
}
