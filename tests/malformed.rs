//! Hostile and broken upstream data: never a panic, always the right drop reason, and the
//! valid siblings of a dropped op still go out (DESIGN.md invariant 6).

mod common;

use common::frames::*;
use contrail::event::Event;
use contrail::transcode::{DropReason, FrameInfo, FrameType, Transcoder};
use ipld_core::ipld::Ipld;
use proptest::prelude::*;

const DID: &str = "did:plc:q6gjnaw2blty4crticxkmujt";
const REV: &str = "3mptbypluud2a";

fn run(frame: &[u8]) -> (FrameInfo, Vec<Event>, Vec<DropReason>) {
    run_with(&mut Transcoder::default(), frame)
}

fn run_with(tx: &mut Transcoder, frame: &[u8]) -> (FrameInfo, Vec<Event>, Vec<DropReason>) {
    let (mut events, mut drops) = (Vec::new(), Vec::new());
    let info = tx.transcode(frame, &mut events, &mut drops);
    (info, events, drops)
}

/// Parses an event's JSON once its `time_us` is stamped (the placeholder is not a JSON number).
fn parse(e: &Event) -> Result<serde_json::Value, serde_json::Error> {
    let mut e = e.clone();
    e.stamp(1_783_175_888_085_434);
    serde_json::from_slice(e.json())
}

/// `{"$type": "app.bsky.feed.like", "a": <value>}` with `value` given as raw CBOR.
fn record_with(value: &[u8]) -> Vec<u8> {
    let mut r = vec![0xa2, 0x61, b'a'];
    r.extend_from_slice(value);
    r.extend_from_slice(&[0x65, b'$', b't', b'y', b'p', b'e', 0x72]);
    r.extend_from_slice(b"app.bsky.feed.like");
    r
}

/// One bad op between two good ones: the bad one is dropped for `reason`, both good ones
/// are emitted.
fn assert_op_dropped(bad: TestOp, reason: DropReason) {
    let ops = [
        TestOp::create("app.bsky.feed.like/3aaaaaaaaaa22", &like_record(1)),
        bad,
        TestOp::delete("app.bsky.feed.like/3aaaaaaaaaa33"),
    ];
    let (info, events, drops) = run(&commit_frame(7, DID, REV, &ops));
    assert_eq!(info.dropped, None);
    assert_eq!(info.seq, Some(7));
    assert_eq!(drops, vec![reason]);
    assert_eq!(events.len(), 2);
    for e in &events {
        parse(e).expect("valid JSON");
    }
}

#[test]
fn a_valid_commit_becomes_one_event_per_op() {
    let ops = [
        TestOp::create("app.bsky.feed.like/3aaaaaaaaaa22", &like_record(1)),
        TestOp::update(
            "app.bsky.actor.profile/self",
            &map(vec![("$type", s("app.bsky.actor.profile")), ("displayName", s("<b>&"))]),
        ),
        TestOp::delete("app.bsky.feed.post/3aaaaaaaaaa44"),
    ];
    let (info, events, drops) = run(&commit_frame(42, DID, REV, &ops));
    assert_eq!((info.frame_type, info.seq, info.dropped), (FrameType::Commit, Some(42), None));
    assert!(drops.is_empty());
    let json: Vec<String> = events.iter().map(|e| String::from_utf8(e.json().to_vec()).unwrap()).collect();
    assert!(json[0].starts_with(r#"{"did":"did:plc:q6gjnaw2blty4crticxkmujt","time_us":0000000000000000,"kind":"commit","commit":{"rev":"3mptbypluud2a","operation":"create","collection":"app.bsky.feed.like","rkey":"3aaaaaaaaaa22","record":{"$type":"app.bsky.feed.like","createdAt":"#), "{}", json[0]);
    assert!(json[1].contains(r#""operation":"update","collection":"app.bsky.actor.profile","rkey":"self","record":{"$type":"app.bsky.actor.profile","displayName":"\u003cb\u003e\u0026"},"cid":"bafyrei"#), "{}", json[1]);
    assert_eq!(
        json[2],
        r#"{"did":"did:plc:q6gjnaw2blty4crticxkmujt","time_us":0000000000000000,"kind":"commit","commit":{"rev":"3mptbypluud2a","operation":"delete","collection":"app.bsky.feed.post","rkey":"3aaaaaaaaaa44"}}"#
    );
    assert_eq!(events[0].collection(), Some("app.bsky.feed.like"));
    assert_eq!(events[0].did(), DID);
}

#[test]
fn identity_and_account_pass_through_in_v1_field_order() {
    let (_, ev, _) = run(&identity_frame(5, DID, Some("alice.test")));
    assert_eq!(
        std::str::from_utf8(ev[0].json()).unwrap(),
        format!(
            r#"{{"did":"{DID}","time_us":0000000000000000,"kind":"identity","identity":{{"did":"{DID}","handle":"alice.test","seq":5,"time":"{TIME}"}}}}"#
        )
    );
    let (_, ev, _) = run(&identity_frame(6, DID, None));
    assert!(!std::str::from_utf8(ev[0].json()).unwrap().contains("handle"));
    let (_, ev, _) = run(&account_frame(7, DID, false, Some("takendown")));
    assert_eq!(
        std::str::from_utf8(ev[0].json()).unwrap(),
        format!(
            r#"{{"did":"{DID}","time_us":0000000000000000,"kind":"account","account":{{"active":false,"did":"{DID}","seq":7,"status":"takendown","time":"{TIME}"}}}}"#
        )
    );
    assert_eq!(ev[0].collection(), None);
}

#[test]
fn op_level_drops_keep_the_siblings() {
    let like = like_record(9);
    assert_op_dropped(
        TestOp { omit_block: true, ..TestOp::create("app.bsky.feed.like/3bbbbbbbbbb22", &like) },
        DropReason::MissingBlock,
    );
    assert_op_dropped(
        TestOp { corrupt_block: true, ..TestOp::create("app.bsky.feed.like/3bbbbbbbbbb22", &like) },
        DropReason::CidMismatch,
    );
    assert_op_dropped(
        TestOp { cid: Some(Some(cid_of(b"elsewhere"))), ..TestOp::create("app.bsky.feed.like/3bbbbbbbbbb22", &like) },
        DropReason::MissingBlock,
    );
    assert_op_dropped(
        TestOp { cid: Some(None), ..TestOp::create("app.bsky.feed.like/3bbbbbbbbbb22", &like) },
        DropReason::MissingCid,
    );
    assert_op_dropped(
        TestOp { action: "mutate".into(), ..TestOp::create("app.bsky.feed.like/3bbbbbbbbbb22", &like) },
        DropReason::UnknownAction,
    );
    for path in ["app.bsky.feed.like", "app.bsky.feed.like/a/b", "notnsid/3bbbbbbbbbb22", "app.bsky.feed.like/..", "/x"]
    {
        assert_op_dropped(TestOp::create(path, &like), DropReason::BadPath);
    }
    // float 1.5, invalid UTF-8, a tag other than 42, undefined, an int beyond int64
    assert_op_dropped(
        TestOp::create_raw("app.bsky.feed.like/3c", record_with(&[0xfb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0])),
        DropReason::Float,
    );
    assert_op_dropped(
        TestOp::create_raw("app.bsky.feed.like/3c", record_with(&[0x62, 0xc3, 0x28])),
        DropReason::InvalidUtf8,
    );
    assert_op_dropped(
        TestOp::create_raw("app.bsky.feed.like/3c", record_with(&[0xc1, 0x01])),
        DropReason::RecordMalformed,
    );
    assert_op_dropped(TestOp::create_raw("app.bsky.feed.like/3c", record_with(&[0xf7])), DropReason::RecordMalformed);
    assert_op_dropped(
        TestOp::create_raw("app.bsky.feed.like/3c", record_with(&[0x1b, 0xff, 0, 0, 0, 0, 0, 0, 0])),
        DropReason::IntOverflow,
    );
    // a string claiming 4 GiB, and a real one over the 1 MiB record limit
    assert_op_dropped(
        TestOp::create_raw("app.bsky.feed.like/3c", record_with(&[0x7b, 0, 0, 0, 1, 0, 0, 0, 0, b'x'])),
        DropReason::RecordMalformed,
    );
    let huge = map(vec![("$type", s("app.bsky.feed.post")), ("text", s(&"x".repeat(1_100_000)))]);
    assert_op_dropped(TestOp::create("app.bsky.feed.post/3c", &huge), DropReason::RecordTooLarge);
    // 10,000 nested arrays
    let mut deep = vec![0x81u8; 10_000];
    deep.push(0x01);
    assert_op_dropped(TestOp::create_raw("app.bsky.feed.like/3c", record_with(&deep)), DropReason::TooDeep);
    // not a map, $type not a string, a blob missing its size
    assert_op_dropped(TestOp::create_raw("app.bsky.feed.like/3c", vec![0x83, 1, 2, 3]), DropReason::RecordNotObject);
    assert_op_dropped(
        TestOp::create("app.bsky.feed.like/3c", &map(vec![("$type", Ipld::Integer(5))])),
        DropReason::BadTypeField,
    );
    let blob = map(vec![
        ("$type", s("blob")),
        ("ref", Ipld::Link(cid_with_codec(b"img", 0x55))),
        ("mimeType", s("image/png")),
    ]);
    assert_op_dropped(
        TestOp::create("app.bsky.feed.like/3c", &map(vec![("$type", s("x.y.z")), ("b", blob)])),
        DropReason::BadBlob,
    );
    // A record that is itself a link, bytes, a blob or a legacy blob, well formed: atdata reads
    // it as that, "not an object", and Jetstream v1 dropped the op (inside a record, each is a
    // value like any other).
    let link = || Ipld::Link(cid_with_codec(b"img", 0x55));
    let cid_text = cid_with_codec(b"img", 0x55).to_string();
    for shape in [
        map(vec![("$link", s(&cid_text))]),
        map(vec![("$bytes", s("aGk"))]),
        map(vec![("$type", s("blob")), ("ref", link()), ("mimeType", s("image/png")), ("size", Ipld::Integer(3))]),
        map(vec![("cid", s(&cid_text)), ("mimeType", s("image/png"))]),
    ] {
        assert_op_dropped(TestOp::create("app.bsky.feed.like/3c", &shape), DropReason::RecordNotObject);
        let (info, events, drops) =
            run(&commit_frame(8, DID, REV, &[TestOp::create("app.bsky.feed.like/3d", &map(vec![("x", shape)]))]));
        assert_eq!((info.dropped, drops.len(), events.len()), (None, 0, 1), "inside a record");
    }
}

#[test]
fn whole_frame_drops_report_the_seq() {
    let ops = [TestOp::create("app.bsky.feed.like/3aaaaaaaaaa22", &like_record(1))];
    let good = commit_frame(11, DID, REV, &ops);

    let mut trailing = good.clone();
    trailing.push(0x00);
    let (info, ev, _) = run(&trailing);
    assert_eq!((info.dropped, info.seq, ev.len()), (Some(DropReason::TrailingBytes), Some(11), 0));

    let (info, ev, _) = run_with(&mut Transcoder::new(100), &good);
    assert_eq!((info.dropped, info.seq, ev.len()), (Some(DropReason::FrameTooLarge), Some(11), 0));

    let too_big = commit_frame_with(12, DID, REV, &ops, |b| {
        b.insert("tooBig".into(), Ipld::Bool(true));
    });
    assert_eq!(run(&too_big).0.dropped, Some(DropReason::TooBig));
    let bad_time = commit_frame_with(13, DID, REV, &ops, |b| {
        b.insert("time".into(), s("yesterday"));
    });
    assert_eq!(run(&bad_time).0.dropped, Some(DropReason::BadTime));
    let bad_car = commit_frame_with(14, DID, REV, &ops, |b| {
        b.insert("blocks".into(), Ipld::Bytes(vec![0x05, 1, 2]));
    });
    assert_eq!(run(&bad_car).0.dropped, Some(DropReason::BadCar));
    let (info, ..) = run(&commit_frame(15, "did:bad", REV, &ops));
    assert_eq!((info.dropped, info.seq), (Some(DropReason::BadDid), Some(15)));
    // A body that fails before its seq (keys in order: `ops`, `rev`, `seq`) still reports it,
    // read from the body's start: read from where the failure left off, it was lost, or taken
    // from inside the bad value (then a relay reset to seq 5, to the reader).
    for bad_rev in [Ipld::Integer(1), Ipld::List(vec![map(vec![("seq", Ipld::Integer(5))])])] {
        let frame = commit_frame_with(18, DID, REV, &ops, |b| {
            b.insert("rev".into(), bad_rev.clone());
        });
        let (info, ..) = run(&frame);
        assert_eq!((info.dropped, info.seq), (Some(DropReason::BadBody), Some(18)), "rev {bad_rev:?}");
    }

    let (info, ..) = run(&unknown_frame(16, "#handle"));
    assert_eq!(
        (info.frame_type, info.dropped, info.seq, info.name.as_deref()),
        (FrameType::Unknown, Some(DropReason::UnknownType), Some(16), Some("#handle"))
    );
    let (info, ..) = run(&error_frame("FutureCursor"));
    assert_eq!(
        (info.frame_type, info.dropped, info.name.as_deref()),
        (FrameType::Error, Some(DropReason::ErrorFrame), Some("FutureCursor"))
    );
    let (info, ..) = run(&info_frame("OutdatedCursor"));
    assert_eq!((info.dropped, info.name.as_deref()), (Some(DropReason::Info), Some("OutdatedCursor")));
    // `#sync` becomes a `sync` event (sent only to clients that ask), shaped like
    // jetstream-legacy PR #79's, with the blocks as `$bytes`.
    let (info, ev, _) = run(&sync_frame(17, DID));
    assert_eq!((info.dropped, info.seq, ev.len()), (None, Some(17), 1));
    let v = parse(&ev[0]).unwrap();
    assert_eq!(ev[0].kind, contrail::event::EventKind::Sync);
    assert_eq!(
        v["sync"],
        serde_json::json!({"blocks": {"$bytes": ""}, "did": DID, "rev": "3mptbypluud2a", "seq": 17, "time": TIME})
    );
    let text = String::from_utf8(ev[0].json().to_vec()).unwrap();
    assert!(text.contains(r#","kind":"sync","sync":{"blocks":{"$bytes":""},"did":""#), "{text}");
    assert_eq!(run(&[]).0.dropped, Some(DropReason::BadHeader));
    assert_eq!(run(&[0xff, 0xff]).0.dropped, Some(DropReason::BadHeader));
}

#[test]
fn every_truncation_of_a_frame_is_dropped_whole() {
    let ops = [
        TestOp::create("app.bsky.feed.like/3aaaaaaaaaa22", &like_record(1)),
        TestOp::delete("app.bsky.feed.like/3aaaaaaaaaa33"),
    ];
    let good = commit_frame(21, DID, REV, &ops);
    for cut in 0..good.len() {
        let (info, ev, _) = run(&good[..cut]);
        assert!(info.dropped.is_some() && ev.is_empty(), "cut at {cut}: {info:?}");
    }
}

fn sample_frames() -> Vec<Vec<u8>> {
    let profile = map(vec![
        ("$type", s("app.bsky.actor.profile")),
        (
            "avatar",
            map(vec![
                ("$type", s("blob")),
                ("ref", Ipld::Link(cid_with_codec(b"img", 0x55))),
                ("mimeType", s("image/png")),
                ("size", Ipld::Integer(10)),
            ]),
        ),
        ("data", Ipld::Bytes(vec![1, 2, 3, 4])),
        ("tags", Ipld::List(vec![s("a"), Ipld::Null, Ipld::Bool(true), Ipld::Integer(-3)])),
    ]);
    vec![
        commit_frame(
            1,
            DID,
            REV,
            &[
                TestOp::create("app.bsky.feed.like/3a", &like_record(2)),
                TestOp::update("app.bsky.actor.profile/self", &profile),
            ],
        ),
        identity_frame(2, DID, Some("a.test")),
        account_frame(3, DID, true, None),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = run(&bytes);
    }

    /// Mutated real-format frames: no panic, and whatever comes out is valid JSON.
    #[test]
    fn mutated_frames_never_panic_and_emit_valid_json(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut f = sample_frames().swap_remove(which);
        for (at, byte, kind) in edits {
            if f.is_empty() { break; }
            let i = at.index(f.len());
            match kind {
                0 => f[i] = byte,
                1 => { f.insert(i, byte); }
                _ => { f.truncate(i); }
            }
        }
        let (_, events, _) = run(&f);
        for e in events {
            prop_assert!(parse(&e).is_ok(), "invalid JSON: {}", String::from_utf8_lossy(e.json()));
        }
    }
}

/// Ops that all point at one ~900 KB record block: the first carries the block, the rest
/// only its CID (the amplification a hostile PDS or relay can send).
fn ops_sharing_one_big_block(n: usize) -> Vec<TestOp> {
    let big = map(vec![
        ("$type", s("app.bsky.feed.post")),
        ("text", s(&"x".repeat(900_000))),
        ("createdAt", s("2026-07-04T14:38:08.999Z")),
    ]);
    ops_sharing_the_block_of(TestOp::create("app.bsky.feed.post/3aaaaaaaaaa00", &big), n)
}

/// `first`, then `n - 1` more creates in its collection pointing at its record's block (the
/// block once in the CAR).
fn ops_sharing_the_block_of(first: TestOp, n: usize) -> Vec<TestOp> {
    let cid = cid_of(first.record.as_ref().unwrap());
    let collection = first.path.split('/').next().unwrap().to_string();
    let mut ops = vec![first];
    for i in 1..n {
        ops.push(TestOp {
            action: "create".into(),
            path: format!("{collection}/3l{i:011}"),
            record: None,
            cid: Some(Some(cid)),
            omit_block: true,
            corrupt_block: false,
        });
    }
    ops
}

#[test]
fn amplifying_commits_are_dropped_or_cut_at_the_protocol_limits() {
    use contrail::transcode::{MAX_COMMIT_OPS, MAX_FRAME_OUTPUT_BYTES};
    // 40,000 ops on one 900 KB block: a < 5 MB frame that would render ~36 GB.
    let frame = commit_frame(1, DID, REV, &ops_sharing_one_big_block(40_000));
    assert!(frame.len() < 5_000_000, "{} bytes", frame.len());
    let (info, events, drops) = run(&frame);
    assert_eq!((info.dropped, info.seq), (Some(DropReason::TooManyOps), Some(1)));
    assert!(events.is_empty() && drops.is_empty(), "rejected before any op was rendered");
    // Within the op limit, the ops sharing the block stop at the frame's output budget.
    let frame = commit_frame(2, DID, REV, &ops_sharing_one_big_block(MAX_COMMIT_OPS as usize));
    let (info, events, drops) = run(&frame);
    assert_eq!(info.dropped, None);
    let rendered: usize = events.iter().map(|e| e.json().len()).sum();
    assert!(rendered <= MAX_FRAME_OUTPUT_BYTES + 1_000_000, "{rendered} bytes rendered");
    assert_eq!(events.len() + drops.len(), MAX_COMMIT_OPS as usize);
    assert!(drops.iter().all(|d| *d == DropReason::OutputBudget), "{drops:?}");
    assert!(drops.len() >= 180);
    // More CAR bytes than the protocol allows: dropped whole.
    let huge = TestOp::create_raw(
        "app.bsky.feed.post/3aaaaaaaaaa01",
        record_with(&{
            let mut v = vec![0x5a];
            v.extend_from_slice(&2_100_000u32.to_be_bytes());
            v.extend(std::iter::repeat_n(7u8, 2_100_000));
            v
        }),
    );
    let (info, _, _) = run(&commit_frame(3, DID, REV, &[huge]));
    assert_eq!(info.dropped, Some(DropReason::BlocksTooLarge));
}

/// `rev`, `handle` and `status` are passed through; one longer than any valid one drops its
/// frame. Unbounded, a 5 MB `rev` of control characters escaped to a ~29 MB event: past the
/// 16 MiB replicas and clients read, so a replica met it again at every reconnect, for good.
#[test]
fn fields_longer_than_any_valid_one_drop_the_frame() {
    use contrail::transcode::{MAX_HANDLE_BYTES, MAX_REV_BYTES, MAX_STATUS_BYTES, MAX_TIME_BYTES};
    let ops = [TestOp::create("app.bsky.feed.like/3aaaaaaaaaa22", &like_record(1))];
    let longest = "3".repeat(MAX_REV_BYTES);
    let (info, events, _) = run(&commit_frame(1, DID, &longest, &ops));
    assert_eq!((info.dropped, events.len()), (None, 1));
    let huge = "\u{1}".repeat(1_000_000);
    for rev in [format!("{longest}3"), huge] {
        let (info, events, _) = run(&commit_frame(2, DID, &rev, &ops));
        assert_eq!((info.dropped, info.seq, events.len()), (Some(DropReason::FieldTooLong), Some(2), 0));
    }
    let handle = |n: usize| format!("{}.test", "a".repeat(n - 5));
    let (info, events, _) = run(&identity_frame(3, DID, Some(&handle(MAX_HANDLE_BYTES))));
    assert_eq!((info.dropped, events.len()), (None, 1));
    let (info, events, _) = run(&identity_frame(4, DID, Some(&handle(MAX_HANDLE_BYTES + 1))));
    assert_eq!((info.dropped, info.seq, events.len()), (Some(DropReason::FieldTooLong), Some(4), 0));
    let status = "x".repeat(MAX_STATUS_BYTES);
    let (info, events, _) = run(&account_frame(5, DID, false, Some(&status)));
    assert_eq!((info.dropped, events.len()), (None, 1));
    let (info, events, _) = run(&account_frame(6, DID, false, Some(&format!("{status}x"))));
    assert_eq!((info.dropped, info.seq, events.len()), (Some(DropReason::FieldTooLong), Some(6), 0));
    // A #sync's rev, and its blocks (held to a commit's 2,000,000 bytes; the lexicon says
    // 10,000 for a #sync).
    let (info, events, _) = run(&sync_frame_with(7, DID, &longest, vec![7; 2_000_000]));
    assert_eq!((info.dropped, events.len()), (None, 1));
    let (info, _, _) = run(&sync_frame_with(8, DID, &format!("{longest}3"), vec![]));
    assert_eq!((info.dropped, info.seq), (Some(DropReason::FieldTooLong), Some(8)));
    let (info, _, _) = run(&sync_frame_with(9, DID, REV, vec![7; 2_000_001]));
    assert_eq!((info.dropped, info.seq), (Some(DropReason::BlocksTooLarge), Some(9)));
    // `time` is passed through too, and RFC 3339 allows a fraction of any length.
    let time = |digits: usize| format!("2026-07-04T14:38:08.{}Z", "9".repeat(digits));
    let (info, events, _) = run(&identity_frame_at(10, DID, None, &time(MAX_TIME_BYTES - 21)));
    assert_eq!((info.dropped, events.len()), (None, 1));
    let (info, events, _) = run(&identity_frame_at(11, DID, None, &time(MAX_TIME_BYTES - 20)));
    assert_eq!((info.dropped, events.len()), (Some(DropReason::FieldTooLong), 0));
}

/// An event holds a buffer of about its own size: after one 6 MB event, the small ones after
/// it do not each carry that capacity (the memory budgets count lengths).
#[test]
fn a_large_event_leaves_no_large_buffers_behind() {
    let large = map(vec![("$type", s("app.bsky.feed.post")), ("text", s(&"\u{1}".repeat(1_000_000)))]);
    let mut tx = Transcoder::default();
    let ops = [TestOp::create("app.bsky.feed.post/3aaaaaaaaaa22", &large)];
    let (info, events, _) = run_with(&mut tx, &commit_frame(1, DID, REV, &ops));
    assert_eq!((info.dropped, events.len()), (None, 1));
    assert!(events[0].json().len() > 6_000_000);
    for seq in 2..5 {
        let ops = [TestOp::create("app.bsky.feed.like/3aaaaaaaaaa22", &like_record(seq as u64))];
        let (_, events, _) = run_with(&mut tx, &commit_frame(seq, DID, REV, &ops));
        assert!(events[0].json_capacity() < 4096, "{} bytes held", events[0].json_capacity());
    }
}

/// The shortest of three transcodings of `frame` (a loaded machine's pause falls in one of
/// them, not in all three), with what the last one gave.
fn fastest_of_three(frame: &[u8]) -> (std::time::Duration, FrameInfo, Vec<Event>, Vec<DropReason>) {
    let mut fastest = std::time::Duration::MAX;
    let mut last = None;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let got = run(frame);
        fastest = fastest.min(started.elapsed());
        last = Some(got);
    }
    let (info, events, drops) = last.expect("three runs");
    (fastest, info, events, drops)
}

/// `rev` and `blocks` are `#sync`'s: in an `#identity` or `#account` they are unknown keys,
/// skipped (as Go's decoder does). Before, they were read as a `#sync`'s: a `rev` of null
/// dropped the event, blocks past 2 MB dropped it, and blocks under that reserved 4/3 of their
/// size in the event's buffer, which the ring's budget (counting lengths) did not see.
#[test]
fn rev_and_blocks_in_an_identity_or_account_frame_are_unknown_keys() {
    let with = |kind: &str, extra: Vec<(&str, Ipld)>| {
        let mut body =
            vec![("seq", Ipld::Integer(1)), ("did", s(DID)), ("time", s(TIME)), ("active", Ipld::Bool(true))];
        body.extend(extra);
        let mut frame = header(kind);
        frame.extend(dag_cbor(&map(body)));
        frame
    };
    for kind in ["#identity", "#account"] {
        let (info, plain, _) = run(&with(kind, vec![]));
        assert_eq!((info.dropped, plain.len()), (None, 1), "{kind}");
        for extra in [
            vec![("blocks", Ipld::Bytes(vec![7; 1_999_999]))],
            vec![("blocks", Ipld::Bytes(vec![7; 2_000_001]))],
            vec![("rev", Ipld::Null), ("blocks", Ipld::Null)],
        ] {
            let (info, events, _) = run(&with(kind, extra));
            assert_eq!((info.dropped, events.len()), (None, 1), "{kind}");
            assert_eq!(events[0].json(), plain[0].json(), "{kind}");
            assert!(events[0].json_capacity() < 4096, "{kind}: {} bytes held", events[0].json_capacity());
        }
    }
}

/// A record just under the size from which containers are indexed, 120 maps deep around an
/// array of 640 items, shared by the 200 ops of one commit: each map's value is skipped over
/// to sort its keys, so one render walks the array once per level (~80,000 steps for ~1 KB).
/// Rendered once per frame and copied for the other ops, not rendered 200 times (what a
/// user's 200 identical records, or a crafted frame of 15 KB, cost before).
#[test]
fn a_record_shared_by_every_op_is_rendered_once_per_frame() {
    use contrail::transcode::MAX_COMMIT_OPS;
    let mut record = vec![0xa1, 0x61, b'z', 0x99, 0x02, 0x80];
    record.extend(std::iter::repeat_n(0u8, 640));
    for _ in 0..119 {
        let mut outer = vec![0xa1, 0x61, b'a'];
        outer.extend_from_slice(&record);
        record = outer;
    }
    assert!(record.len() < 1024, "{} bytes: indexed", record.len());
    let ops =
        ops_sharing_the_block_of(TestOp::create_raw("com.example.deep/3aaaaaaaaaa00", record), MAX_COMMIT_OPS as usize);
    let timed = |ops: &[TestOp]| fastest_of_three(&commit_frame(1, DID, REV, ops));
    let (one, _, first, _) = timed(&ops[..1]);
    let (all, info, events, drops) = timed(&ops);
    assert_eq!((info.dropped, drops.len(), events.len()), (None, 0, MAX_COMMIT_OPS as usize), "{drops:?}");
    let record_of = |e: &Event| parse(e).unwrap()["commit"]["record"].to_string();
    let want = record_of(&first[0]);
    assert!(want.contains("[0,0,0"), "{want}");
    assert!(events.iter().all(|e| record_of(e) == want), "an op's record differs");
    assert!(all < one * 20, "200 ops took {all:?}, one {one:?}");
}

/// A record that is 120 maps deep around ~900 KB of items, ending in a float (so it fails at
/// the very end), shared by the 200 ops of one commit. A map's values are skipped over before
/// they are written (to sort its keys): without the index of container spans each byte was
/// walked once per enclosing map, and each op rendered the block again, about 2·10¹⁰ steps
/// for this one frame (minutes of a runtime thread). Now one pass, once (the index's own
/// test: `a_deeply_nested_record_is_walked_a_few_times_not_once_per_level` in the core).
#[test]
fn a_deeply_nested_record_shared_by_every_op_costs_one_pass() {
    use contrail::transcode::MAX_COMMIT_OPS;
    // The innermost map: seven arrays of 131,072 zeros, then "z": 1.5.
    let mut inner = vec![0xa8];
    for key in b'a'..=b'g' {
        inner.extend_from_slice(&[0x61, key, 0x9a]);
        inner.extend_from_slice(&(128u32 * 1024).to_be_bytes());
        inner.extend(std::iter::repeat_n(0u8, 128 * 1024));
    }
    inner.extend_from_slice(&[0x61, b'z', 0xfb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]);
    let mut record = inner.clone();
    for _ in 0..119 {
        let mut outer = vec![0xa1, 0x61, b'a'];
        outer.extend_from_slice(&record);
        record = outer;
    }
    assert!(record.len() < 1024 * 1024);
    let ops =
        ops_sharing_the_block_of(TestOp::create_raw("com.example.deep/3aaaaaaaaaa00", record), MAX_COMMIT_OPS as usize);
    // One op on the block, then all 200: the ops after the first fail at once (the block's
    // failure is remembered), so the frame costs about what one op does, not 200 times it.
    let timed = |ops: &[TestOp]| fastest_of_three(&commit_frame(1, DID, REV, ops));
    let (one, ..) = timed(&ops[..1]);
    let (all, info, events, drops) = timed(&ops);
    assert!(all < one * 20, "200 ops took {all:?}, one {one:?}");
    assert_eq!(info.dropped, None);
    assert!(events.is_empty());
    assert_eq!(drops, vec![DropReason::Float; MAX_COMMIT_OPS as usize]);
    // Without the float the same block renders, each op in one pass, until the output budget.
    let mut good = inner[..inner.len() - 11].to_vec();
    good[0] = 0xa7;
    for _ in 0..119 {
        let mut outer = vec![0xa1, 0x61, b'a'];
        outer.extend_from_slice(&good);
        good = outer;
    }
    let (info, events, drops) =
        run(&commit_frame(2, DID, REV, &[TestOp::create_raw("com.example.deep/3aaaaaaaaaa01", good)]));
    assert_eq!((info.dropped, drops.len(), events.len()), (None, 0, 1), "{drops:?}");
    let v = parse(&events[0]).unwrap();
    let mut at = &v["commit"]["record"];
    for _ in 0..119 {
        at = &at["a"];
    }
    assert_eq!(at["g"].as_array().map(Vec::len), Some(128 * 1024));
}

/// Go's Jetstream renders CIDv0 links (old records) as base58btc `Qm…`, and reads `$link`
/// strings in any multibase, writing them back in the canonical form; the expected strings
/// come from the independent `cid` crate.
#[test]
fn cid_v0_links_and_other_multibases_render_as_go_does() {
    use ipld_core::cid::multibase::Base;
    use ipld_core::cid::Cid;
    let mut v0_bytes = vec![0x12, 0x20];
    v0_bytes.extend_from_slice(&[7u8; 32]);
    let v0 = Cid::try_from(v0_bytes.as_slice()).unwrap();
    assert_eq!(v0.version(), ipld_core::cid::Version::V0);
    let v1 = cid_of(b"a block");
    let record = map(vec![
        ("$type", s("com.example.thing")),
        ("old", Ipld::Link(v0)),
        ("new", Ipld::Link(v1)),
        ("viaZ", map(vec![("$link", s(&v1.to_string_of_base(Base::Base58Btc).unwrap()))])),
        ("viaHex", map(vec![("$link", s(&v1.to_string_of_base(Base::Base16Lower).unwrap()))])),
        ("viaB64", map(vec![("$link", s(&v1.to_string_of_base(Base::Base64).unwrap()))])),
        ("bareV0", map(vec![("$link", s(&v0.to_string()))])),
    ]);
    let ops = [TestOp::create("com.example.thing/3aaaaaaaaaa22", &record)];
    let (info, events, drops) = run(&commit_frame(9, DID, REV, &ops));
    assert_eq!((info.dropped, drops.len(), events.len()), (None, 0, 1), "{drops:?}");
    let v = parse(&events[0]).unwrap();
    let rec = &v["commit"]["record"];
    let v0s = v0.to_string();
    assert!(v0s.starts_with("Qm"), "{v0s}");
    assert_eq!(rec["old"]["$link"], v0s.as_str());
    assert_eq!(rec["bareV0"]["$link"], v0s.as_str());
    let v1s = v1.to_string();
    for k in ["new", "viaZ", "viaHex", "viaB64"] {
        assert_eq!(rec[k]["$link"], v1s.as_str(), "{k}");
    }
    // Not a CID in any base: still a dropped op.
    let bad = map(vec![("$type", s("com.example.thing")), ("x", map(vec![("$link", s("zzzz"))]))]);
    let (_, events, drops) =
        run(&commit_frame(10, DID, REV, &[TestOp::create("com.example.thing/3aaaaaaaaaa23", &bad)]));
    assert_eq!((events.len(), drops), (0, vec![DropReason::BadLink]));
}
