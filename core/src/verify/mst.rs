//! The Merkle Search Tree, as much of it as a commit's CAR carries, and the Sync 1.1 proof:
//! undo the commit's operations on that partial tree and check the root comes out as the
//! previous commit's `data` (`prevData`).
//!
//! The tree is held flat: its records in key order, with the subtrees the CAR does not carry
//! kept as opaque stubs (their CID and layer) between them. Any MST is determined by its keys,
//! so rebuilding the nodes from that list gives the same CIDs the signer computed — as long as
//! no rebuilt node needs the inside of a stub, which a complete proof guarantees and an
//! incomplete one is refused for.
//!
//! Node format (atproto repository spec): `{l: link|null, e: [{p, k, v, t}]}`; a key's layer is
//! the number of leading zero bits of its SHA-256, halved (fanout 4).

use super::commit::{write_head, Action, Blocks, KeyOrder, ProofOp};
use super::Failure;
use crate::transcode::cbor::{Reader, ARRAY, BYTES, MAP, TAG, TEXT, UINT};
use crate::transcode::cid::dag_cbor_cid_of;
use sha2::{Digest, Sha256};

/// A key's layer in the tree.
pub fn key_height(key: &[u8]) -> u32 {
    let digest = Sha256::digest(key);
    let mut zeros = 0;
    for b in digest {
        if b == 0 {
            zeros += 8;
            continue;
        }
        zeros += b.leading_zeros();
        break;
    }
    zeros / 2
}

/// A node block: its CID and its bytes.
pub type NodeBlock = (Vec<u8>, Vec<u8>);

/// An entry of a node being built: key, record CID, right subtree.
type NewEntry<'a> = (&'a [u8], &'a [u8], Option<Vec<u8>>);

/// Where a key is or would go among a tree's items: the index of the first leaf at or after
/// it, whether that leaf is the key, and whether a stub lies between it and the leaf before
/// (then the key may be inside the stub: the proof does not say whether it is in the tree).
#[derive(Debug, Clone, Copy)]
struct Located {
    index: usize,
    found: bool,
    hidden: bool,
}

/// One change to a located key.
#[derive(Clone, Copy)]
enum Change<'a> {
    Insert(&'a [u8]),
    Remove,
    Set(&'a [u8]),
}

/// One record, or a subtree the proof did not include.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Leaf { key: Vec<u8>, value: Vec<u8>, height: u32 },
    Stub { cid: Vec<u8>, layer: u32 },
}

/// A partial tree, flat.
#[derive(Debug, Clone, Default)]
pub struct PartialTree {
    pub items: Vec<Item>,
}

/// What loading tracks: every node is read once (a CAR whose nodes point at one child many
/// times, layer after layer, would otherwise unfold into exponentially many records), and
/// keys increase across nodes as they are read.
#[derive(Default)]
struct Loading {
    seen: std::collections::HashSet<Vec<u8>>,
    last_key: Option<Vec<u8>>,
    /// The bytes of the keys rebuilt so far ([`MAX_KEY_BYTES_LOADED`]).
    key_bytes: usize,
}

/// A repo path is a collection (an NSID, at most 317 bytes), `/` and a record key (at most
/// 512): a longer MST key is no record's. Prefix compression lets a 16-byte entry rebuild a key
/// as long as the one before plus a byte, so without this bound one node of N entries rebuilt
/// N²/2 bytes of keys (gigabytes from a 2 MB block).
const MAX_KEY_BYTES: usize = 1024;
/// The keys one tree's load may rebuild in all: a commit's proof holds at most a few thousand
/// entries (200 ops, a root-to-leaf path each), of real keys (tens of bytes): ~200 KB; a 2 MB
/// CAR of nothing but nodes, ~50,000 entries of real keys, ~3 MB. A signed hostile node (each
/// entry a ~1 KiB key from a few bytes) is cut here: hashing and copying the keys costs ~16
/// times what they weigh, on the verification task.
const MAX_KEY_BYTES_LOADED: usize = 8 << 20;

/// MST nodes are small; a CAR of 2 MB cannot hold more nodes than this many levels deep.
const MAX_LAYER: u32 = 128;

impl PartialTree {
    /// A whole tree from its records (any order; later duplicates replace earlier ones).
    pub fn from_records<'k>(records: impl IntoIterator<Item = (&'k [u8], &'k [u8])>) -> PartialTree {
        let mut map = std::collections::BTreeMap::new();
        for (k, v) in records {
            map.insert(k.to_vec(), v.to_vec());
        }
        let items = map
            .into_iter()
            .map(|(key, value)| {
                let height = key_height(&key);
                Item::Leaf { key, value, height }
            })
            .collect();
        PartialTree { items }
    }

    /// Loads the tree under `root` from `blocks`; subtrees not in the CAR become stubs.
    pub fn load(blocks: &Blocks<'_>, root: &[u8]) -> Result<PartialTree, Failure> {
        let mut tree = PartialTree::default();
        let mut loading = Loading::default();
        loading.seen.insert(root.to_vec());
        let block = blocks.get_verified(root)?.ok_or(Failure::Proof("the MST root is not in the CAR"))?;
        let node = Node::parse(block)?;
        let Some(layer) = node.layer() else {
            if node.left.is_some() {
                return Err(Failure::Proof("the MST root has no entries but a subtree"));
            }
            return Ok(tree); // the empty repository
        };
        tree.load_node(blocks, node, layer, 0, &mut loading)?;
        Ok(tree)
    }

    fn load_node(
        &mut self,
        blocks: &Blocks<'_>,
        node: Node<'_>,
        layer: u32,
        depth: u32,
        loading: &mut Loading,
    ) -> Result<(), Failure> {
        if depth > MAX_LAYER {
            return Err(Failure::Proof("MST too deep"));
        }
        if let Some(l) = node.left {
            self.load_subtree(blocks, l, layer, depth, loading)?;
        }
        let mut prev_key: Vec<u8> = Vec::new();
        for (i, e) in node.entries.iter().enumerate() {
            let p = e.prefix as usize;
            if p > prev_key.len() || (i == 0 && p != 0) {
                return Err(Failure::Proof("MST entry prefix longer than the previous key"));
            }
            if p + e.suffix.len() > MAX_KEY_BYTES {
                return Err(Failure::Proof("an MST key longer than any repo path"));
            }
            loading.key_bytes += p + e.suffix.len();
            if loading.key_bytes > MAX_KEY_BYTES_LOADED {
                return Err(Failure::Proof("MST keys past 8 MiB in one proof"));
            }
            let mut key = prev_key[..p].to_vec();
            key.extend_from_slice(e.suffix);
            let height = key_height(&key);
            if height != layer {
                return Err(Failure::Proof("MST key on the wrong layer"));
            }
            // Across the whole tree, as read: a key not after the last one read is out of order.
            if loading.last_key.as_ref().is_some_and(|last| *last >= key) {
                return Err(Failure::Proof("MST keys out of order"));
            }
            loading.last_key = Some(key.clone());
            self.items.push(Item::Leaf { key: key.clone(), value: e.value.to_vec(), height });
            if let Some(t) = e.right {
                self.load_subtree(blocks, t, layer, depth, loading)?;
            }
            prev_key = key;
        }
        Ok(())
    }

    /// A child of a node at `parent_layer`.
    fn load_subtree(
        &mut self,
        blocks: &Blocks<'_>,
        cid: &[u8],
        parent_layer: u32,
        depth: u32,
        loading: &mut Loading,
    ) -> Result<(), Failure> {
        let layer = parent_layer.checked_sub(1).ok_or(Failure::Proof("MST subtree below layer 0"))?;
        // In a real tree every node has one parent (distinct key ranges give distinct CIDs).
        if !loading.seen.insert(cid.to_vec()) {
            return Err(Failure::Proof("an MST node is referenced twice"));
        }
        match blocks.get_verified(cid)? {
            None => {
                self.items.push(Item::Stub { cid: cid.to_vec(), layer });
                Ok(())
            }
            Some(block) => {
                let node = Node::parse(block)?;
                if node.entries.is_empty() && node.left.is_none() {
                    return Err(Failure::Proof("empty MST node inside the tree"));
                }
                self.load_node(blocks, node, layer, depth + 1, loading)
            }
        }
    }

    /// Where `key` is or would go, and whether a stub could be hiding it.
    fn locate(&self, key: &[u8]) -> Located {
        self.locate_sorted(std::iter::once(key))[0]
    }

    /// [`PartialTree::locate`] for every key of `keys`, which come in ascending order, in one
    /// pass over the items: a commit's 200 ops in a node of 20,000 entries are 20,000 steps,
    /// not 200 times as many.
    fn locate_sorted<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) -> Vec<Located> {
        let mut out = Vec::new();
        let (mut i, mut stub_since_last_leaf) = (0, false);
        for key in keys {
            loop {
                match self.items.get(i) {
                    None => {
                        out.push(Located { index: i, found: false, hidden: stub_since_last_leaf });
                        break;
                    }
                    Some(Item::Stub { .. }) => stub_since_last_leaf = true,
                    Some(Item::Leaf { key: k, .. }) => {
                        if k.as_slice() >= key {
                            let found = k.as_slice() == key;
                            out.push(Located { index: i, found, hidden: stub_since_last_leaf });
                            break;
                        }
                        stub_since_last_leaf = false;
                    }
                }
                i += 1;
            }
        }
        out
    }

    /// The record CID a [`Located`] key has, if the proof shows it.
    fn value_at(&self, at: Located) -> Result<Option<&[u8]>, Failure> {
        if at.found {
            let Item::Leaf { value, .. } = &self.items[at.index] else { unreachable!() };
            return Ok(Some(value));
        }
        if at.hidden {
            return Err(Failure::Proof("the proof does not cover an op's key"));
        }
        Ok(None)
    }

    /// Makes `changes`, in ascending order of distinct keys, each at where
    /// [`PartialTree::locate_sorted`] found its key (a removed or set key there, an inserted
    /// one not there and not hidden by a stub), in one pass.
    fn apply_sorted(&mut self, changes: &[(&[u8], Located, Change<'_>)]) {
        let old = std::mem::take(&mut self.items);
        let inserts = changes.iter().filter(|c| matches!(c.2, Change::Insert(_))).count();
        self.items.reserve(old.len() + inserts);
        let mut old = old.into_iter().enumerate().peekable();
        for (key, at, change) in changes {
            while let Some((_, item)) = old.next_if(|(i, _)| *i < at.index) {
                self.items.push(item);
            }
            match change {
                Change::Insert(value) => {
                    self.items.push(Item::Leaf { key: key.to_vec(), value: value.to_vec(), height: key_height(key) })
                }
                Change::Remove => {
                    old.next();
                }
                Change::Set(value) => {
                    if let Some((_, Item::Leaf { key, height, .. })) = old.next() {
                        self.items.push(Item::Leaf { key, value: value.to_vec(), height });
                    }
                }
            }
        }
        self.items.extend(old.map(|(_, item)| item));
    }

    /// The record CID under `key`, if the proof shows it.
    pub fn get(&self, key: &[u8]) -> Result<Option<&[u8]>, Failure> {
        self.value_at(self.locate(key))
    }

    pub fn insert(&mut self, key: &[u8], value: &[u8]) -> Result<(), Failure> {
        let at = self.locate(key);
        if at.found {
            return Err(Failure::Proof("key already in the tree"));
        }
        if at.hidden {
            return Err(Failure::Proof("the proof does not cover an op's key"));
        }
        self.apply_sorted(&[(key, at, Change::Insert(value))]);
        Ok(())
    }

    pub fn remove(&mut self, key: &[u8]) -> Result<(), Failure> {
        let at = self.locate(key);
        if !at.found {
            return Err(Failure::Proof("key not in the tree"));
        }
        self.apply_sorted(&[(key, at, Change::Remove)]);
        Ok(())
    }

    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), Failure> {
        let at = self.locate(key);
        if !at.found {
            return Err(Failure::Proof("key not in the tree"));
        }
        self.apply_sorted(&[(key, at, Change::Set(value))]);
        Ok(())
    }

    /// The root CID of the tree these items make.
    pub fn root_cid(&self) -> Result<Vec<u8>, Failure> {
        self.encode(&mut None)
    }

    /// The root CID and every node block the items make (stubs stay CIDs): how a writer (or a
    /// test relay) produces the blocks of a tree.
    pub fn blocks(&self) -> Result<(Vec<u8>, Vec<NodeBlock>), Failure> {
        let mut out = Vec::new();
        let root = self.encode(&mut Some(&mut out))?;
        Ok((root, out))
    }

    fn encode(&self, sink: &mut Option<&mut Vec<NodeBlock>>) -> Result<Vec<u8>, Failure> {
        if self.items.is_empty() {
            let block = encode_node(None, &[]);
            let cid = dag_cbor_cid_of(&block);
            if let Some(s) = sink {
                s.push((cid.clone(), block));
            }
            return Ok(cid);
        }
        let top = self
            .items
            .iter()
            .map(|i| match i {
                Item::Leaf { height, .. } => *height,
                Item::Stub { layer, .. } => layer + 1,
            })
            .max()
            .unwrap_or(0);
        let has_top_leaf = self.items.iter().any(|i| matches!(i, Item::Leaf { height, .. } if *height == top));
        // A root never consists of a lone subtree pointer (the tree is trimmed at the top).
        let layer = if has_top_leaf { top } else { top - 1 };
        build(layer, &self.items, sink)?.ok_or(Failure::Proof("empty MST"))
    }
}

/// Builds the node at `layer` holding `items`; `None` for nothing.
fn build(layer: u32, items: &[Item], sink: &mut Option<&mut Vec<NodeBlock>>) -> Result<Option<Vec<u8>>, Failure> {
    match items {
        [] => return Ok(None),
        [Item::Stub { cid, layer: l }] if *l == layer => return Ok(Some(cid.clone())),
        _ => {}
    }
    // The entries of this node, and the runs of items between them (its subtrees).
    let mut entries: Vec<NewEntry<'_>> = Vec::new();
    let mut left = None;
    let mut run_start = 0;
    let child_layer = layer.checked_sub(1);
    let subtree = |run: &[Item], sink: &mut Option<&mut Vec<NodeBlock>>| {
        if run.is_empty() {
            return Ok(None);
        }
        match child_layer {
            Some(c) => build(c, run, sink),
            None => Err(Failure::Proof("MST items below layer 0")),
        }
    };
    for (i, item) in items.iter().enumerate() {
        match item {
            Item::Leaf { key, value, height } if *height == layer => {
                let t = subtree(&items[run_start..i], sink)?;
                match entries.last_mut() {
                    Some(last) => last.2 = t,
                    None => left = t,
                }
                entries.push((key, value, None));
                run_start = i + 1;
            }
            Item::Leaf { height, .. } if *height > layer => return Err(Failure::Proof("MST key above its node")),
            Item::Stub { layer: l, .. } if *l >= layer => {
                // The node would have to be merged with a subtree the proof did not include.
                return Err(Failure::Proof("the proof lacks a node the operations change"));
            }
            _ => {}
        }
    }
    let t = subtree(&items[run_start..], sink)?;
    match entries.last_mut() {
        Some(last) => last.2 = t,
        None => left = t,
    }
    let block = encode_node(left.as_deref(), &entries);
    let cid = dag_cbor_cid_of(&block);
    if let Some(s) = sink {
        s.push((cid.clone(), block));
    }
    Ok(Some(cid))
}

fn write_link(out: &mut Vec<u8>, cid: Option<&[u8]>) {
    match cid {
        None => out.push(0xf6),
        Some(c) => {
            write_head(out, TAG, 42);
            write_head(out, BYTES, c.len() as u64 + 1);
            out.push(0);
            out.extend_from_slice(c);
        }
    }
}

fn write_key(out: &mut Vec<u8>, k: &str) {
    write_head(out, TEXT, k.len() as u64);
    out.extend_from_slice(k.as_bytes());
}

/// A node's canonical DAG-CBOR: map keys in length-then-byte order (`e`, `l`; `k`, `p`, `t`,
/// `v`), keys prefix-compressed against the previous entry.
fn encode_node(left: Option<&[u8]>, entries: &[NewEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + entries.len() * 80);
    write_head(&mut out, MAP, 2);
    write_key(&mut out, "e");
    write_head(&mut out, ARRAY, entries.len() as u64);
    let mut prev: &[u8] = &[];
    for (key, value, right) in entries {
        let p = prev.iter().zip(key.iter()).take_while(|(a, b)| a == b).count();
        write_head(&mut out, MAP, 4);
        write_key(&mut out, "k");
        write_head(&mut out, BYTES, (key.len() - p) as u64);
        out.extend_from_slice(&key[p..]);
        write_key(&mut out, "p");
        write_head(&mut out, UINT, p as u64);
        write_key(&mut out, "t");
        write_link(&mut out, right.as_deref());
        write_key(&mut out, "v");
        write_link(&mut out, Some(value));
        prev = key;
    }
    write_key(&mut out, "l");
    write_link(&mut out, left);
    out
}

struct Entry<'a> {
    prefix: u64,
    suffix: &'a [u8],
    value: &'a [u8],
    right: Option<&'a [u8]>,
}

struct Node<'a> {
    left: Option<&'a [u8]>,
    entries: Vec<Entry<'a>>,
}

impl<'a> Node<'a> {
    fn parse(block: &'a [u8]) -> Result<Node<'a>, Failure> {
        let bad = |_| Failure::Proof("malformed MST node");
        let mut r = Reader::new(block);
        let n = r.read_map_len().map_err(bad)?;
        let mut node = Node { left: None, entries: Vec::new() };
        let mut keys = KeyOrder::default();
        for _ in 0..n {
            let key = r.read_str().map_err(bad)?;
            keys.next(key)?;
            match key {
                "l" => node.left = link_or_null(&mut r)?,
                "e" => {
                    let len = r.read_array_len().map_err(bad)?;
                    for _ in 0..len {
                        let m = r.read_map_len().map_err(bad)?;
                        let (mut prefix, mut suffix, mut value, mut right) = (None, None, None, None);
                        let mut entry_keys = KeyOrder::default();
                        for _ in 0..m {
                            let k = r.read_str().map_err(bad)?;
                            entry_keys.next(k)?;
                            match k {
                                "p" => prefix = Some(r.read_i64().map_err(bad)?),
                                "k" => suffix = Some(r.read_bytes().map_err(bad)?),
                                "v" => value = Some(r.read_link().map_err(bad)?),
                                "t" => right = link_or_null(&mut r)?,
                                _ => r.skip().map_err(bad)?,
                            }
                        }
                        let (Some(p), Some(k), Some(v)) = (prefix, suffix, value) else {
                            return Err(Failure::Proof("MST entry missing a field"));
                        };
                        let prefix = u64::try_from(p).map_err(|_| Failure::Proof("negative MST prefix"))?;
                        node.entries.push(Entry { prefix, suffix: k, value: v, right });
                    }
                }
                _ => r.skip().map_err(bad)?,
            }
        }
        if !r.is_empty() {
            return Err(Failure::Proof("bytes after an MST node"));
        }
        Ok(node)
    }

    /// The node's layer, from its first key (a node's keys share one); `None` when it has none.
    fn layer(&self) -> Option<u32> {
        self.entries.first().map(|e| key_height(e.suffix))
    }
}

fn link_or_null<'a>(r: &mut Reader<'a>) -> Result<Option<&'a [u8]>, Failure> {
    if r.read_null().map_err(|_| Failure::Proof("malformed MST node"))? {
        Ok(None)
    } else {
        r.read_link().map(Some).map_err(|_| Failure::Proof("malformed MST node"))
    }
}

/// Each op's place in `tree`, indexed like `ops`, from one pass over the tree, and the ops'
/// indices in ascending order of path.
fn locate_ops(tree: &PartialTree, ops: &[ProofOp<'_>]) -> (Vec<Located>, Vec<usize>) {
    let mut order: Vec<usize> = (0..ops.len()).collect();
    order.sort_unstable_by_key(|&i| ops[i].path);
    let found = tree.locate_sorted(order.iter().map(|&i| ops[i].path.as_bytes()));
    let mut at = vec![Located { index: 0, found: false, hidden: false }; ops.len()];
    for (&i, f) in order.iter().zip(found) {
        at[i] = f;
    }
    (at, order)
}

/// The forward check, for commits without a proof: each op's record CID is what the signed
/// tree (rooted at `data`) holds under its path — created and updated records present with
/// their CID, deleted ones absent.
pub fn check_ops_in_tree(blocks: &Blocks<'_>, data: &[u8], ops: &[ProofOp<'_>]) -> Result<(), Failure> {
    let tree = PartialTree::load(blocks, data)?;
    let (at, _) = locate_ops(&tree, ops);
    for (op, at) in ops.iter().zip(at) {
        let now = tree.value_at(at)?;
        let ok = match op.action {
            Action::Create | Action::Update => now.is_some() && now == op.cid,
            Action::Delete => now.is_none(),
        };
        if !ok {
            return Err(Failure::Proof("an op does not match the signed tree"));
        }
    }
    Ok(())
}

/// Sync 1.1's inductive proof: the ops, undone on the tree after the commit (rooted at
/// `data`), give the tree before it (`prev_data`).
///
/// The ops are on distinct paths, so each is checked against the tree after the commit (in
/// the ops' order: the first failure is the one reported) and all are undone in one pass. A
/// key is placed between its neighbours in that tree, which the proof shows; undoing another op
/// first (removing a neighbour) cannot move it.
pub fn check_inversion(blocks: &Blocks<'_>, data: &[u8], ops: &[ProofOp<'_>], prev_data: &[u8]) -> Result<(), Failure> {
    if ops.is_empty() {
        // An empty commit (legal) changes no record: the tree is the one before, which is the
        // whole proof, and its diff need not carry a block of it.
        return if data == prev_data { Ok(()) } else { Err(Failure::Proof("a commit without ops changed the tree")) };
    }
    let mut tree = PartialTree::load(blocks, data)?;
    let (at, order) = locate_ops(&tree, ops);
    // Two ops on one path cannot both be undone against the same tree.
    if order.windows(2).any(|w| ops[w[0]].path == ops[w[1]].path) {
        return Err(Failure::Proof("two ops on one path"));
    }
    let mut undo = Vec::with_capacity(ops.len());
    for (op, &at) in ops.iter().zip(&at) {
        let now = tree.value_at(at)?;
        undo.push(match op.action {
            Action::Create => {
                let cid = op.cid.ok_or(Failure::Malformed("create without cid"))?;
                if now != Some(cid) {
                    return Err(Failure::Proof("a created record is not in the tree"));
                }
                Change::Remove
            }
            Action::Update => {
                let (cid, prev) = (op.cid.ok_or(Failure::Malformed("update without cid"))?, op.prev);
                let prev = prev.ok_or(Failure::NoProof("update without prev"))?;
                // Undoing it would change nothing: any unchanged record could be claimed updated.
                if prev == cid {
                    return Err(Failure::Proof("an update whose prev is its cid"));
                }
                if now != Some(cid) {
                    return Err(Failure::Proof("an updated record is not in the tree"));
                }
                Change::Set(prev)
            }
            Action::Delete => {
                let prev = op.prev.ok_or(Failure::NoProof("delete without prev"))?;
                if now.is_some() {
                    return Err(Failure::Proof("a deleted record is still in the tree"));
                }
                Change::Insert(prev)
            }
        });
    }
    let changes: Vec<_> = order.iter().map(|&i| (ops[i].path.as_bytes(), at[i], undo[i])).collect();
    tree.apply_sorted(&changes);
    if tree.root_cid()? != prev_data {
        return Err(Failure::Proof("undoing the ops does not give prevData"));
    }
    Ok(())
}
