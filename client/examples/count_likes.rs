//! Counts likes per minute, resuming where it stopped: the cursor is kept in `likes.cursor`, so
//! a restart goes on after the last like handled, not from the live edge. The counts themselves
//! are in memory: the minute in progress at a stop is not printed, and after a crash up to the
//! last second's likes are counted again. Exact counts keep them with the cursor, in one store
//! written as one (a `CursorStore` of your own).
//! `cargo run -p contrail-client --example count_likes -- wss://host-a wss://host-b`

use contrail_client::{process, CursorStore, Event, FileCursorStore, ProcessOptions, Subscription};
use std::sync::{Arc, Mutex};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut urls: Vec<String> = std::env::args().skip(1).collect();
    if urls.is_empty() {
        urls.push("ws://127.0.0.1:6008".into());
    }
    let store = FileCursorStore::new("likes.cursor");
    let sub =
        Subscription::builder(urls).collections(["app.bsky.feed.like"]).compress(true).cursor(store.load()?).start()?;
    // (minute, likes in it)
    let counts = Arc::new(Mutex::new((0u64, 0u64)));
    let handler = move |event: Event| {
        let counts = counts.clone();
        async move {
            let minute = event.time_us() / 60_000_000;
            let mut c = counts.lock().unwrap();
            if c.0 != minute {
                if c.0 != 0 {
                    println!("minute {}: {} likes", c.0, c.1);
                }
                *c = (minute, 0);
            }
            c.1 += 1;
            Ok::<(), std::convert::Infallible>(())
        }
    };
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    process(sub, store, ProcessOptions::default(), handler, ctrl_c).await?;
    Ok(())
}
