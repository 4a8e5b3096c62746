//! Differential fuzzing of the classifier: seeded, structure-aware random and mutated frames
//! through the real classifier (BPF_PROG_TEST_RUN) and through a reference model of the
//! specified semantics (`fuzz/model.rs`); every verdict and counted reason must agree.
//!
//! `FUZZ_SEED` (default fixed) and `FUZZ_FRAMES` (default 20,000) control the run; the
//! regression corpus in `fuzz/corpus/` is replayed first. Privileged (root): run by
//! `cargo xtask test` (short) and `cargo xtask fuzz` (long).

#[path = "fuzz/frames.rs"]
mod frames;
#[path = "fuzz/model.rs"]
mod model;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use aya::programs::{TestRun as _, TestRunOptions};
use policy_agent::compile::{MapContents, diff};
use policy_agent::datapath::{Datapath, Hook, Maps, PinLayout, map_name};
use policy_common::{
    Direction,
    conntrack::{CtKey, CtReleased, CtUsage, CtValue, FragKey, FragValue, usage_slot},
    counters::Reason,
    endpoint::EndpointInfo,
    event::{CONFIG_EVENTS_ALLOWED, CONFIG_EVENTS_DENIED, Config},
    family,
    ipcache::{IpcacheKey, IpcacheValue},
    policy::{PolicyKey, PolicyValue},
};

// The only testbed import (it may move to its own crate).
use testbed::Bpffs;

use frames::Gen;
use model::{Change, CtEntry, IFINDEX, Model, Outcome, bytes16};

const TCX_NEXT: u32 = 0xFFFF_FFFF;
const TC_ACT_SHOT: u32 = 2;
const DEFAULT_SEED: u64 = 0x5EED_F022_2026_1201;
const DEFAULT_FRAMES: u64 = 20_000;
/// Far in the future on any clock the classifier uses.
const FOREVER_NS: u64 = u64::MAX / 2;
/// Detailed reports (and corpus files) per run; divergences beyond are only counted.
const MAX_REPORTS: usize = 25;
const MAX_SAVED: usize = 12;

fn hook(dir: Direction) -> Hook {
    match dir {
        Direction::Egress => Hook::FromPod,
        Direction::Ingress => Hook::ToPod,
    }
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Egress => "egress",
        Direction::Ingress => "ingress",
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::with_capacity(b.len() * 2), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex")).collect()
}

/// What the kernel did with one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Got {
    ret: u32,
    /// Reasons whose counter moved, with the delta.
    moved: Vec<(Reason, u64)>,
}

impl Got {
    fn agrees(&self, want: Outcome) -> bool {
        self.ret == if want.pass { TCX_NEXT } else { TC_ACT_SHOT } && self.moved == [(want.reason, 1)]
    }

    fn describe(&self) -> String {
        let verdict = match self.ret {
            TCX_NEXT => "pass(TCX_NEXT)".to_string(),
            TC_ACT_SHOT => "drop".to_string(),
            other => format!("ret={other}"),
        };
        let reasons: Vec<String> = self.moved.iter().map(|(r, n)| if *n == 1 { r.name().to_string() } else { format!("{}x{n}", r.name()) }).collect();
        format!("{verdict} {}", if reasons.is_empty() { "(no counter)".into() } else { reasons.join(",") })
    }
}

fn describe(o: Outcome) -> String {
    format!("{} {}", if o.pass { "pass(TCX_NEXT)" } else { "drop" }, o.reason.name())
}

/// The loaded classifier on a private bpffs.
struct Kernel {
    datapath: Datapath,
    maps: Maps,
    frags: BpfHashMap<MapData, FragKey, FragValue>,
    ct_usage: Array<MapData, CtUsage>,
    ct_released: Array<MapData, CtReleased>,
    /// Mirror of what the compiler-owned maps hold.
    contents: MapContents,
    /// Last seen packet count per counter slot.
    counters: HashMap<u32, u64>,
    _bpffs: Bpffs,
}

impl Kernel {
    fn new() -> Self {
        let bpffs = Bpffs::new("fz");
        let mut datapath = Datapath::load(PinLayout::new(&bpffs.path)).expect("load classifier");
        let maps = datapath.take_maps().expect("maps");
        let data = MapData::from_pin(datapath.pins().map(map_name::FRAGMENTS)).expect("fragments map pinned");
        let frags = BpfHashMap::try_from(Map::from_map_data(data).expect("map")).expect("fragments map type");
        let open = |name: &str| Map::from_map_data(MapData::from_pin(datapath.pins().map(name)).unwrap_or_else(|e| panic!("{name} pinned: {e}"))).expect("map");
        let ct_usage = Array::try_from(open("CT_USAGE_V1")).expect("CT_USAGE type");
        let ct_released = Array::try_from(open("CT_RELEASED_V1")).expect("CT_RELEASED type");
        Self { datapath, maps, frags, ct_usage, ct_released, contents: MapContents::default(), counters: HashMap::new(), _bpffs: bpffs }
    }

    /// Brings the compiler-owned maps to `desired` with the agent's write order.
    fn set_maps(&mut self, desired: &MapContents) {
        for op in diff(&self.contents, desired).ordered_ops() {
            self.maps.write(&op).unwrap_or_else(|(map, e)| panic!("write {map}: {e}"));
            self.contents.apply(&op);
        }
    }

    /// The classifier's settings: events on or off (the ring is never drained, so it also
    /// runs full), and the per-endpoint conntrack budget.
    fn config(&mut self, events: u32, events_per_sec: u32, ct_budget: u32) {
        let config = Config { flags: events, events_per_sec, ct_budget, _pad: 0 };
        self.maps.config.set(0, config, 0).expect("config");
    }

    fn clear_state(&mut self) {
        // The entries go, and so does what the classifier counted of them.
        for ep in [0u32, 7, 12, 4095] {
            for origin in 0..2 {
                let slot = usage_slot(ep, origin);
                self.ct_usage.set(slot, CtUsage::default(), 0).expect("CT_USAGE");
                self.ct_released.set(slot, CtReleased::default(), 0).expect("CT_RELEASED");
            }
        }
        let keys: Vec<CtKey> = self.maps.conntrack.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.maps.conntrack.remove(&k);
        }
        let keys: Vec<FragKey> = self.frags.keys().filter_map(Result::ok).collect();
        for k in keys {
            let _ = self.frags.remove(&k);
        }
    }

    /// Inserts an entry as the classifier would have (counted as opened by its endpoint).
    fn inject_ct(&mut self, key: CtKey, e: CtEntry, expired: bool) {
        let expires_ns = if expired { 1 } else { FOREVER_NS };
        let value = CtValue { expires_ns, cookie: e.cookie, origin: e.origin as u8, tcp_flags: 0, flags: 0, _pad: 0, revision: e.revision, _pad2: 0 };
        self.maps.conntrack.insert(key, value, 0).expect("conntrack insert");
        let slot = usage_slot(key.endpoint, e.origin as u8);
        let mut usage = self.ct_usage.get(&slot, 0).expect("CT_USAGE");
        usage.opened += 1;
        self.ct_usage.set(slot, usage, 0).expect("CT_USAGE");
    }

    /// Lets an entry's lifetime run out (as if its timeout had passed).
    fn age_ct(&mut self, key: &CtKey) -> bool {
        let Ok(mut value) = self.maps.conntrack.get(key, 0) else { return false };
        value.expires_ns = 1;
        self.maps.conntrack.insert(*key, value, 0).is_ok()
    }

    fn slots(ep: u32, dir: Direction) -> impl Iterator<Item = (u32, Reason)> {
        Reason::ALL.into_iter().map(move |r| (r.slot(ep, dir), r)).chain(std::iter::once((Reason::PassUnmanaged.slot(0, dir), Reason::PassUnmanaged)))
    }

    fn read(&self, slot: u32) -> u64 {
        self.maps.counters.get(&slot, 0).map(|v| v.iter().map(|c| c.packets).sum()).unwrap_or(0)
    }

    /// Records the current counters of `ep` (both directions) as the baseline.
    fn baseline(&mut self, ep: u32) {
        for dir in [Direction::Ingress, Direction::Egress] {
            for (slot, _) in Self::slots(ep, dir) {
                let v = self.read(slot);
                self.counters.insert(slot, v);
            }
        }
    }

    fn run(&mut self, ep: u32, dir: Direction, frame: &[u8]) -> Result<Got, String> {
        let program = self.datapath.program(hook(dir)).expect("program");
        let opts = TestRunOptions { data_in: Some(frame), ..TestRunOptions::default() };
        let ret = program.test_run(opts).map_err(|e| e.to_string())?.return_value;
        let mut moved = Vec::new();
        for (slot, reason) in Self::slots(ep, dir) {
            let now = self.read(slot);
            let before = self.counters.insert(slot, now).unwrap_or(0);
            if now != before {
                moved.push((reason, now.wrapping_sub(before)));
            }
        }
        Ok(Got { ret, moved })
    }

    fn ct(&self) -> BTreeMap<String, String> {
        self.maps
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (ct_name(&k), format!("origin={} revision={}", v.origin, v.revision)))
            .collect()
    }

    fn frag_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.frags.keys().filter_map(Result::ok).map(|k| frag_name(&k)).collect();
        v.sort();
        v
    }
}

fn addr(fam: u8, b: &[u8; 16]) -> IpAddr {
    if fam == family::IPV4 { IpAddr::from([b[0], b[1], b[2], b[3]]) } else { IpAddr::from(*b) }
}

fn ct_name(k: &CtKey) -> String {
    format!("ep={} fam={} proto={} pod={}:{} peer={}:{}", k.endpoint, k.family, k.protocol, addr(k.family, &k.pod_addr), k.pod_port(), addr(k.family, &k.peer_addr), k.peer_port())
}

/// The fragment id's representation is the kernel's business: compared without it.
fn frag_name(k: &FragKey) -> String {
    format!("ep={} fam={} proto={} dir={} {} -> {}", k.endpoint, k.family, k.protocol, k.direction, addr(k.family, &k.src_addr), addr(k.family, &k.dst_addr))
}

// ---- Regression corpus ----

#[derive(Clone, Debug, Default)]
struct Case {
    name: String,
    maps: MapContents,
    ct: Vec<(CtKey, CtEntry, bool)>,
    ct_budget: u32,
    /// Frames run first (they recreate fragment state); the last frame is the case.
    frames: Vec<(Direction, Vec<u8>)>,
}

/// The regression corpus (`FUZZ_CORPUS` replaces it, e.g. with a directory of probes).
fn corpus_dir() -> PathBuf {
    std::env::var_os("FUZZ_CORPUS").map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus"), PathBuf::from)
}

fn parse_dir(s: &str) -> Direction {
    match s {
        "egress" | "1" => Direction::Egress,
        "ingress" | "0" => Direction::Ingress,
        other => panic!("direction {other}"),
    }
}

fn ipkey(a: IpAddr) -> IpcacheKey {
    match a {
        IpAddr::V4(a) => IpcacheKey::v4(a.octets()),
        IpAddr::V6(a) => IpcacheKey::v6(a.octets()),
    }
}


fn render_case(header: &str, maps: &MapContents, model: &Model, frames: &[(Direction, Vec<u8>)]) -> String {
    let mut s = String::new();
    for line in header.lines() {
        let _ = writeln!(s, "# {line}");
    }
    for (ifindex, e) in &maps.endpoints {
        let _ = writeln!(
            s,
            "endpoint {ifindex} {} {:#x} {} {} {:#x} {:#x} {}",
            e.id,
            e.flags,
            IpAddr::from(e.ipv4),
            IpAddr::from(e.ipv6),
            e.lookups[0],
            e.lookups[1],
            e.revision
        );
    }
    for ((len, k), v) in &maps.ipcache {
        let _ = writeln!(s, "ipcache {len} {} {}", addr(k.family(), k.addr()), v.identity);
    }
    for ((len, k), v) in &maps.policy {
        let _ = writeln!(s, "policy {len} {} {} {} {} {} {} {}", k.endpoint(), k.identity(), k.direction().map_or(9, |d| d as u8), k.protocol(), k.port(), v.cookie, v.action);
    }
    let _ = writeln!(s, "ct_budget {}", model.ct_budget);
    let mut ct: Vec<_> = model.ct.iter().collect();
    ct.sort_by_key(|(k, _)| ct_name(k));
    for (k, e) in ct {
        let _ = writeln!(
            s,
            "ct {} {} {} {} {} {} {} {} {} {}{}",
            k.endpoint,
            k.family,
            k.protocol,
            addr(k.family, &k.pod_addr),
            k.pod_port(),
            addr(k.family, &k.peer_addr),
            k.peer_port(),
            dir_name(e.origin),
            e.revision,
            e.cookie,
            if model.expired.contains(k) { " expired" } else { "" }
        );
    }
    for (d, f) in frames {
        let _ = writeln!(s, "frame {} {}", dir_name(*d), hex(f));
    }
    s
}

fn load_case(name: &str, text: &str) -> Case {
    let mut c = Case { name: name.to_string(), ct_budget: 100_000, ..Case::default() };
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let t: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> u64 {
            let s = t[i];
            s.strip_prefix("0x").map_or_else(|| s.parse().expect("number"), |h| u64::from_str_radix(h, 16).expect("hex number"))
        };
        let ip = |i: usize| -> IpAddr { t[i].parse().expect("address") };
        match t[0] {
            "endpoint" => {
                let IpAddr::V4(v4) = ip(4) else { panic!("ipv4") };
                let IpAddr::V6(v6) = ip(5) else { panic!("ipv6") };
                let info = EndpointInfo {
                    id: num(2) as u32,
                    flags: num(3) as u32,
                    ipv4: v4.octets(),
                    ipv6: v6.octets(),
                    lookups: [num(6) as u8, num(7) as u8],
                    _pad: [0; 2],
                    revision: num(8) as u32,
                };
                c.maps.endpoints.insert(num(1) as u32, info);
            }
            "ipcache" => {
                c.maps.ipcache.insert((num(1) as u32, ipkey(ip(2))), IpcacheValue { identity: num(3) as u32 });
            }
            "policy" => {
                let key = PolicyKey::new(num(2) as u32, num(3) as u32, parse_dir(t[4]), num(5) as u8, num(6) as u16);
                // The action is optional (cases saved before deny entries existed allow).
                let action = if t.len() > 8 { num(8) as u32 } else { policy_common::policy::ACTION_ALLOW };
                c.maps.policy.insert((num(1) as u32, key), PolicyValue { cookie: num(7) as u32, action });
            }
            "ct" => {
                let key = CtKey::new(num(1) as u32, num(2) as u8, num(3) as u8, bytes16(ip(4)), num(5) as u16, bytes16(ip(6)), num(7) as u16);
                let expired = t.get(11) == Some(&"expired");
                c.ct.push((key, CtEntry { origin: parse_dir(t[8]), revision: num(9) as u32, cookie: num(10) as u32 }, expired));
            }
            "frame" => c.frames.push((parse_dir(t[1]), unhex(t[2]))),
            "ct_budget" => c.ct_budget = num(1) as u32,
            other => panic!("{name}: unknown line {other}"),
        }
    }
    c
}

// ---- The run ----

struct Run {
    seed: u64,
    kernel: Kernel,
    model: Model,
    /// The frame that created each fragment entry (to rebuild it in a corpus case).
    frag_origin: HashMap<FragKey, (Direction, Vec<u8>)>,
    divergences: usize,
    saved: usize,
    skipped: usize,
    by_kind: BTreeMap<String, usize>,
    model_time: f64,
    new_divergences: usize,
    /// Another endpoint id whose entries the kernel holds this epoch (not compared).
    foreign: Option<u32>,
    /// Model verdicts per frame class (coverage).
    reasons: BTreeMap<(&'static str, &'static str), u64>,
    save: bool,
}

impl Run {
    fn ep_id(&self) -> u32 {
        self.model.endpoint().map_or(0, |e| e.id)
    }

    /// Resets kernel and model to `maps` with empty state.
    fn reset(&mut self, maps: &MapContents) {
        self.kernel.set_maps(maps);
        self.kernel.clear_state();
        self.model.maps = maps.clone();
        self.model.ct.clear();
        self.model.expired.clear();
        self.model.frags.clear();
        self.frag_origin.clear();
        let id = self.ep_id();
        self.kernel.baseline(id);
    }

    /// Applies a map change (within an epoch) to both.
    fn change(&mut self, maps: &MapContents) {
        self.kernel.set_maps(maps);
        self.model.maps = maps.clone();
        let id = self.ep_id();
        self.kernel.baseline(id);
    }

    /// One frame through both; returns whether they agree.
    fn step(&mut self, label: &str, class: &'static str, dir: Direction, frame: &[u8]) -> bool {
        let t0 = Instant::now();
        let (want, changes) = self.model.judge(frame, dir);
        self.model_time += t0.elapsed().as_secs_f64();
        *self.reasons.entry((class, want.reason.name())).or_default() += 1;
        for c in &changes {
            let what = match c {
                Change::CtDelete(_) => "ct revoked",
                Change::CtPut(k, _) if self.model.ct.contains_key(k) => "ct re-judged, kept",
                Change::CtPut(..) => "ct created",
                Change::FragPut(_) => "fragment recorded",
                Change::BudgetFull => "ct budget spent",
            };
            *self.reasons.entry(("(state)", what)).or_default() += 1;
        }
        let got = match self.kernel.run(self.ep_id(), dir, frame) {
            Ok(got) => got,
            Err(e) => {
                if self.skipped < 3 || std::env::var_os("FUZZ_VERBOSE").is_some() {
                    eprintln!("fuzz: {label}: BPF_PROG_TEST_RUN refused a {}-byte frame ({e}): {}", frame.len(), hex(frame));
                }
                self.skipped += 1;
                return true;
            }
        };
        let agrees = got.agrees(want);
        if !agrees {
            self.report(label, class, dir, frame, want, &got);
        }
        self.model.commit(&changes);
        for c in &changes {
            if let Change::FragPut(k) = c {
                self.frag_origin.insert(*k, (dir, frame.to_vec()));
            }
        }
        agrees
    }

    fn report(&mut self, label: &str, class: &str, dir: Direction, frame: &[u8], want: Outcome, got: &Got) {
        let pre = &self.model;
        self.divergences += 1;
        let kind = format!("{class}: {} want {} got {}", dir_name(dir), describe(want), got.describe());
        *self.by_kind.entry(kind).or_default() += 1;
        self.new_divergences += 1;
        if self.new_divergences <= MAX_REPORTS {
            let ep = pre.maps.endpoints.get(&IFINDEX).map_or("none".to_string(), |e| format!("id={} flags={:#x} revision={} lookups={:?}", e.id, e.flags, e.revision, e.lookups));
            eprintln!(
                "DIVERGENCE seed={:#x} {label} class={class} dir={} endpoint[{ep}] ct={} frags={}\n  frame={}\n  model: {}\n  kernel: {}",
                self.seed,
                dir_name(dir),
                pre.ct.len(),
                pre.frags.len(),
                hex(frame),
                describe(want),
                got.describe()
            );
        }
        if self.save && self.saved < MAX_SAVED {
            self.saved += 1;
            let mut frames: Vec<(Direction, Vec<u8>)> = pre.frags.iter().filter_map(|k| self.frag_origin.get(k).cloned()).collect();
            frames.sort();
            frames.dedup();
            frames.push((dir, frame.to_vec()));
            let header = format!(
                "seed={:#x} {label} class={class} direction={}\nmodel: {}\nkernel: {}",
                self.seed,
                dir_name(dir),
                describe(want),
                got.describe()
            );
            let text = render_case(&header, &pre.maps, pre, &frames);
            let dir_ = corpus_dir();
            let _ = std::fs::create_dir_all(&dir_);
            let file = dir_.join(format!("{:016x}-{}.txt", self.seed, label.replace([' ', '='], "-")));
            if let Err(e) = std::fs::write(&file, text) {
                eprintln!("fuzz: cannot save {}: {e}", file.display());
            } else {
                eprintln!("  saved {}", file.display());
            }
        }
    }

    /// Compares conntrack and fragment state at the end of an epoch.
    fn compare_state(&mut self, label: &str) {
        // Expired entries nobody met yet may or may not be there.
        let expired: std::collections::HashSet<String> = self.model.expired.iter().map(ct_name).collect();
        let want: BTreeMap<String, String> = self
            .model
            .ct
            .iter()
            .filter(|(k, _)| !self.model.expired.contains(*k))
            .map(|(k, e)| (ct_name(k), format!("origin={} revision={}", e.origin as u8, e.revision)))
            .collect();
        let mut got = self.kernel.ct();
        let foreign = self.foreign.map(|id| format!("ep={id} "));
        got.retain(|k, _| !expired.contains(k) && !foreign.as_ref().is_some_and(|f| k.starts_with(f.as_str())));
        let mut want_f: Vec<String> = self.model.frags.iter().map(frag_name).collect();
        want_f.sort();
        let got_f = self.kernel.frag_names();
        if want == got && want_f == got_f {
            return;
        }
        self.divergences += 1;
        *self.by_kind.entry("state at end of epoch".into()).or_default() += 1;
        self.new_divergences += 1;
        if self.new_divergences <= MAX_REPORTS {
            eprintln!("STATE DIVERGENCE seed={:#x} {label}", self.seed);
            for (k, v) in &want {
                if got.get(k) != Some(v) {
                    eprintln!("  model only/different: {k} {v} (kernel: {:?})", got.get(k));
                }
            }
            for (k, v) in &got {
                if !want.contains_key(k) {
                    eprintln!("  kernel only: {k} {v}");
                }
            }
            if want_f != got_f {
                eprintln!("  fragments model={want_f:?}\n  fragments kernel={got_f:?}");
            }
        }
    }

    fn replay_corpus(&mut self) -> usize {
        let Ok(dir) = std::fs::read_dir(corpus_dir()) else { return 0 };
        let mut files: Vec<PathBuf> = dir.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "txt")).collect();
        files.sort();
        for path in &files {
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let case = load_case(&name, &std::fs::read_to_string(path).expect("read corpus"));
            self.kernel.config(0, 0, case.ct_budget);
            self.model.ct_budget = case.ct_budget;
            self.reset(&case.maps);
            for (k, e, expired) in &case.ct {
                self.kernel.inject_ct(*k, *e, *expired);
                self.model.ct.insert(*k, *e);
                if *expired {
                    self.model.expired.insert(*k);
                }
            }
            for (i, (d, f)) in case.frames.iter().enumerate() {
                self.step(&format!("corpus {} frame={i}", case.name), "corpus", *d, f);
            }
        }
        files.len()
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.trim();
            v.strip_prefix("0x").map_or_else(|| v.parse(), |h| u64::from_str_radix(h, 16)).unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        }
        Err(_) => default,
    }
}

#[test]
#[ignore = "privileged: run by cargo xtask test / cargo xtask fuzz"]
fn classifier_matches_reference_model() {
    let seed = env_u64("FUZZ_SEED", DEFAULT_SEED);
    let total = env_u64("FUZZ_FRAMES", DEFAULT_FRAMES);
    let save = std::env::var("FUZZ_SAVE").map_or(true, |v| v != "0");
    let start = Instant::now();
    let mut run = Run {
        seed,
        kernel: Kernel::new(),
        model: Model::default(),
        frag_origin: HashMap::new(),
        divergences: 0,
        saved: 0,
        skipped: 0,
        by_kind: BTreeMap::new(),
        reasons: BTreeMap::new(),
        model_time: 0.0,
        new_divergences: 0,
        foreign: None,
        save: false,
    };
    let cases = run.replay_corpus();
    let corpus_divergences = run.divergences;
    run.save = save;

    let mut generator = Gen::new(seed);
    let mut done = 0u64;
    let mut epoch = 0u64;
    let mut classes: BTreeMap<&'static str, u64> = BTreeMap::new();
    while done < total {
        let mut maps = generator.scenario(IFINDEX);
        let events = generator.rng.pick(&[0, 0, CONFIG_EVENTS_DENIED, CONFIG_EVENTS_DENIED | CONFIG_EVENTS_ALLOWED]);
        let rate = generator.rng.pick(&[0, 5, 1000, u32::MAX]);
        let budget = if generator.rng.chance(1, 8) { generator.rng.below(6) as u32 } else { 100_000 };
        run.kernel.config(events, rate, budget);
        run.model.ct_budget = budget;
        run.reset(&maps);
        generator.reset();
        if generator.rng.chance(1, 4) {
            // Another endpoint's flows on the same tuples, and its budget spent: none of it
            // may matter to this endpoint.
            let foreign = if run.ep_id() == 12 { 7 } else { 12 };
            for (frame, dir) in generator.openings(3) {
                if let model::Parsed::Ip(ip) = model::parse(&frame)
                    && let model::L4::Normal { sport, dport, .. } = ip.l4
                {
                    let key = model::ct_key(foreign, dir, ip.proto, ip.src, sport, ip.dst, dport);
                    run.kernel.inject_ct(key, CtEntry { origin: dir, revision: 0, cookie: 0 }, false);
                }
            }
            for origin in 0..2 {
                run.kernel.ct_usage.set(usage_slot(foreign, origin), CtUsage { opened: 1 << 40, closed: 0 }, 0).expect("CT_USAGE");
            }
            run.foreign = Some(foreign);
        } else {
            run.foreign = None;
        }
        let len = generator.rng.range(50, 400).min(total - done);
        let mut broken = false;
        for i in 0..len {
            if generator.rng.chance(1, 40) {
                generator.change(&mut maps, IFINDEX);
                run.change(&maps);
            }
            if !run.model.ct.is_empty() && generator.rng.chance(1, 30) {
                // Time passes for one flow.
                let mut keys: Vec<&CtKey> = run.model.ct.keys().collect();
                keys.sort_by_key(|k| ct_name(k));
                let key = *keys[generator.rng.below(keys.len() as u64) as usize];
                if run.kernel.age_ct(&key) {
                    run.model.expired.insert(key);
                }
            }
            let (frame, dir, class) = generator.frame();
            *classes.entry(class).or_default() += 1;
            let label = format!("frame={} epoch={epoch} i={i}", done + i);
            if !run.step(&label, class, dir, &frame) {
                // The two states may differ from here on: start a new epoch.
                done += i + 1;
                broken = true;
                break;
            }
        }
        if !broken {
            done += len;
            run.compare_state(&format!("epoch={epoch} frames<{done}"));
        }
        epoch += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "fuzz: seed={seed:#x} corpus={cases} ({corpus_divergences} diverged) frames={done} epochs={epoch} skipped={} divergences={} time={secs:.1}s (model {:.1}s)",
        run.skipped, run.divergences, run.model_time
    );
    eprintln!("fuzz: classes {classes:?}");
    if std::env::var_os("FUZZ_VERBOSE").is_some() {
        let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
        for ((class, reason), n) in &run.reasons {
            eprintln!("  {class:>14} {reason:<16} {n}");
            *totals.entry(reason).or_default() += n;
        }
        eprintln!("fuzz: model reasons {totals:?}");
    }
    for (kind, n) in &run.by_kind {
        eprintln!("  {n:6} x {kind}");
    }
    assert_eq!(run.divergences, 0, "{} divergences between the classifier and the model (seed {seed:#x})", run.divergences);
}

/// The model against the spec's own examples (no kernel needed).
#[cfg(test)]
mod model_checks {
    use super::*;
    use frames::{ALLOWED_ID, ALLOWED4, DENIED4, LL_NODE6, MC_ALL6, NODE6, POD4, POD6, Packet, eth, icmp, tcp, udp};
    use policy_common::{
        endpoint::{FLAG_AUDIT, FLAG_EGRESS_ISOLATED, FLAG_HAS_IPV4, FLAG_HAS_IPV6, FLAG_INGRESS_ISOLATED},
        identity,
        policy::PREFIX_FULL,
        proto,
    };

    fn model(flags: u32) -> Model {
        let mut m = Model { ct_budget: 1000, ..Model::default() };
        let info = EndpointInfo {
            id: 7,
            flags: flags | FLAG_HAS_IPV4 | FLAG_HAS_IPV6,
            ipv4: POD4.octets(),
            ipv6: POD6.octets(),
            lookups: [0; 2],
            _pad: [0; 2],
            revision: 1,
        };
        m.maps.endpoints.insert(IFINDEX, info);
        m.maps.ipcache.insert((IpcacheKey::lpm_prefix_len(32), IpcacheKey::v4(ALLOWED4.octets())), IpcacheValue { identity: ALLOWED_ID });
        m.maps.ipcache.insert((IpcacheKey::lpm_prefix_len(128), IpcacheKey::v6(NODE6.octets())), IpcacheValue { identity: identity::HOST });
        m
    }

    fn allow(m: &mut Model, dir: Direction, protocol: u8, port: u16) {
        m.maps.policy.insert((PREFIX_FULL, PolicyKey::new(7, ALLOWED_ID, dir, protocol, port)), PolicyValue::allow(16));
        let mut info = m.maps.endpoints[&IFINDEX];
        info.lookups = frames::mask(&m.maps, 7);
        m.maps.endpoints.insert(IFINDEX, info);
    }

    fn judge(m: &mut Model, dir: Direction, frame: &[u8]) -> (bool, Reason) {
        let (out, changes) = m.judge(frame, dir);
        m.commit(&changes);
        (out.pass, out.reason)
    }

    fn v4(a: std::net::Ipv4Addr) -> IpAddr {
        IpAddr::V4(a)
    }
    fn v6(a: std::net::Ipv6Addr) -> IpAddr {
        IpAddr::V6(a)
    }

    #[test]
    fn spec_examples() {
        use Direction::{Egress, Ingress};
        let syn = Packet::new(v4(POD4), v4(ALLOWED4), proto::TCP, tcp(40000, 80, frames::TCP_SYN)).frame();
        let synack = Packet::new(v4(ALLOWED4), v4(POD4), proto::TCP, tcp(80, 40000, frames::TCP_SYN | frames::TCP_ACK)).frame();
        // Unmanaged.
        let mut m = Model::default();
        assert_eq!(judge(&mut m, Egress, &syn), (true, Reason::PassUnmanaged));
        // Not isolated: pass, no state; spoofed egress dropped anyway.
        let mut m = model(0);
        assert_eq!(judge(&mut m, Egress, &syn), (true, Reason::PassNotIsolated));
        assert!(m.ct.is_empty());
        let spoofed = Packet::new(v4(DENIED4), v4(ALLOWED4), proto::UDP, udp(1, 53, 0)).frame();
        assert_eq!(judge(&mut m, Egress, &spoofed), (false, Reason::DropSpoofed));
        // VLAN tag, other EtherType, ARP sender.
        let mut tagged = syn[..12].to_vec();
        tagged.extend([0x81, 0x00, 0, 0]);
        tagged.extend(&syn[12..]);
        assert_eq!(judge(&mut m, Egress, &tagged), (false, Reason::DropFrame));
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 2];
        arp.extend(DENIED4.octets());
        arp.extend([0; 10]);
        assert_eq!(judge(&mut m, Egress, &eth(0x0806, &arp)), (false, Reason::DropFrame));
        assert_eq!(judge(&mut m, Ingress, &eth(0x0806, &arp)), (true, Reason::PassNonIp));
        arp[14..18].copy_from_slice(&POD4.octets());
        assert_eq!(judge(&mut m, Egress, &eth(0x0806, &arp)), (true, Reason::PassNonIp));
        // Egress isolated: policy, reply, established; denied port.
        let mut m = model(FLAG_EGRESS_ISOLATED);
        allow(&mut m, Egress, proto::TCP, 80);
        assert_eq!(judge(&mut m, Egress, &syn), (true, Reason::PassPolicy));
        assert_eq!(judge(&mut m, Ingress, &synack), (true, Reason::PassReply));
        assert_eq!(judge(&mut m, Egress, &syn), (true, Reason::PassEstablished));
        let other = Packet::new(v4(POD4), v4(ALLOWED4), proto::TCP, tcp(40000, 81, frames::TCP_SYN)).frame();
        assert_eq!(judge(&mut m, Egress, &other), (false, Reason::DropPolicy));
        // Revocation: new revision and no entry -> the flow is cut; audit keeps it.
        m.maps.policy.clear();
        let mut info = m.maps.endpoints[&IFINDEX];
        info.revision = 2;
        m.maps.endpoints.insert(IFINDEX, info);
        // Ingress is not enforced, but the entry is revoked (egress-opened) and SYN|ACK opens nothing.
        assert_eq!(judge(&mut m, Ingress, &synack), (true, Reason::PassNotIsolated));
        assert!(m.ct.is_empty());
        assert_eq!(judge(&mut m, Egress, &syn), (false, Reason::DropPolicy));
        // Only opening packets create state in a non-enforced direction.
        let mut m = model(FLAG_EGRESS_ISOLATED);
        let ack_in = Packet::new(v4(ALLOWED4), v4(POD4), proto::TCP, tcp(80, 40000, frames::TCP_ACK)).frame();
        assert_eq!(judge(&mut m, Ingress, &ack_in), (true, Reason::PassNotIsolated));
        assert!(m.ct.is_empty());
        assert_eq!(judge(&mut m, Egress, &syn), (false, Reason::DropPolicy));
        // ICMP error related only on the reply path.
        let mut m = model(FLAG_EGRESS_ISOLATED | FLAG_INGRESS_ISOLATED);
        allow(&mut m, Egress, proto::TCP, 80);
        judge(&mut m, Egress, &syn);
        let quoted = Packet::new(v4(POD4), v4(ALLOWED4), proto::TCP, tcp(40000, 80, frames::TCP_SYN)).ip();
        let err = Packet::new(v4(ALLOWED4), v4(POD4), proto::ICMP, icmp(3, 1, 0, &quoted)).frame();
        assert_eq!(judge(&mut m, Ingress, &err), (true, Reason::PassReply));
        let err = Packet::new(v4(DENIED4), v4(POD4), proto::ICMP, icmp(3, 1, 0, &quoted)).frame();
        assert_eq!(judge(&mut m, Ingress, &err), (false, Reason::DropPolicy));
        let mut big = quoted.clone();
        big.resize(600, 0);
        let err = Packet::new(v4(ALLOWED4), v4(POD4), proto::ICMP, icmp(3, 1, 0, &big)).frame();
        assert_eq!(judge(&mut m, Ingress, &err), (false, Reason::DropFrame));
        // Link control.
        let mut m = model(FLAG_AUDIT);
        let mut ns = Packet::new(v6(LL_NODE6), v6(MC_ALL6), proto::ICMPV6, icmp(135, 0, 0, &[0; 16]));
        ns.ttl = 255;
        assert_eq!(judge(&mut m, Ingress, &ns.frame()), (true, Reason::PassNonIp));
        ns.ttl = 64;
        assert_eq!(judge(&mut m, Ingress, &ns.frame()), (false, Reason::DropFrame));
        let mut ra = Packet::new(v6(POD6), v6(MC_ALL6), proto::ICMPV6, icmp(134, 0, 0, &[0; 16]));
        ra.ttl = 255;
        assert_eq!(judge(&mut m, Egress, &ra.frame()), (false, Reason::DropFrame));
        let mut mld = Packet::new(v6(POD6), v6(NODE6), proto::ICMPV6, icmp(143, 0, 0, &[0; 16]));
        mld.ttl = 1;
        assert_eq!(judge(&mut m, Egress, &mld.frame()), (true, Reason::PassNonIp));
        // Seven extension headers are malformed, six are not; two fragment headers are.
        let mut m = model(0);
        let mut p = Packet::new(v6(POD6), v6(NODE6), proto::UDP, udp(1, 2, 0));
        p.ext = vec![frames::Ext::Opts(60, 0); 6];
        assert_eq!(judge(&mut m, Egress, &p.frame()), (true, Reason::PassNotIsolated));
        p.ext.push(frames::Ext::Opts(60, 0));
        assert_eq!(judge(&mut m, Egress, &p.frame()), (false, Reason::DropMalformed));
        p.ext = vec![frames::Ext::Frag(0, false, 1), frames::Ext::Frag(0, false, 1)];
        assert_eq!(judge(&mut m, Egress, &p.frame()), (false, Reason::DropMalformed));
    }
}
