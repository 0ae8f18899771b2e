//! Prints the text of each new post: `cargo run -p contrail-client --example print_posts -- wss://host`.

use contrail_client::{Message, Subscription};

#[derive(serde::Deserialize)]
struct Post<'a> {
    #[serde(borrow)]
    text: std::borrow::Cow<'a, str>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args().nth(1).unwrap_or_else(|| "ws://127.0.0.1:6008".into());
    let mut sub = Subscription::builder([url]).collections(["app.bsky.feed.post"]).start()?;
    loop {
        if let Message::Event(event) = sub.next().await? {
            if let Some(Ok(post)) = event.record::<Post>() {
                println!("{}: {}", event.did(), post.text);
            }
        }
    }
}
