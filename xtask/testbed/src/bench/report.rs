//! REPORT.md, summary.json (the medians), SVG plots (hand-written SVG: lines and bars), and
//! results.json with every raw sample, kept out of the repository.

use std::{fmt::Write as _, path::{Path, PathBuf}};

use policy_agent::datapath::map_name;
use serde::{Deserialize, Serialize};

use super::{
    Machine, attach, control, crr, scale, tiers,
    datapath::{self, PATHS},
    flood::{self, Kind, Variant},
};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub quick: bool,
    pub run_secs: f64,
    pub machine: Machine,
    pub datapath: Option<datapath::Results>,
    /// TEST_RUN with random peers at up to 1M entries (`scale` part).
    #[serde(default)]
    pub scale: Option<scale::Results>,
    /// A new flow with ClusterNetworkPolicy tiers and without (`tiers` part).
    #[serde(default)]
    pub tiers: Option<tiers::Results>,
    pub flood: Option<flood::Results>,
    pub compile: Vec<control::CompileResult>,
    pub latency: Option<control::LatencyResults>,
    pub rss: Option<control::RssResult>,
    pub attach: Option<attach::AttachResults>,
    /// Parts that failed (panicked); the others are still reported.
    pub failures: Vec<String>,
}

fn ns(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn pps(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v < 1e4 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{:.0} k", v / 1e3)
    }
}

fn ratio(v: f64) -> String {
    if v.is_finite() { format!("{v:.2}x") } else { "-".into() }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Writes the raw samples to `raw_dir`/results.json and the report to `dir` (REPORT.md,
/// summary.json, SVGs); returns the files written.
pub fn write(results: &Results, dir: &Path, raw_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(raw_dir)?;
    let json = raw_dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(results).expect("json"))?;
    let mut files = vec![json];
    files.extend(write_report(results, dir)?);
    Ok(files)
}

/// Writes REPORT.md, summary.json and the SVGs to `dir`; returns the files written.
pub fn write_report(results: &Results, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut files = vec![write_summary(results, dir)?];
    if let Some(dp) = &results.datapath {
        let p = dir.join("datapath.svg");
        std::fs::write(&p, datapath_svg(dp))?;
        files.push(p);
    }
    if let Some(fl) = &results.flood {
        let p = dir.join("flood.svg");
        std::fs::write(&p, flood_svg(fl))?;
        files.push(p);
    }
    if let Some(lat) = &results.latency {
        let p = dir.join("latency.svg");
        std::fs::write(&p, latency_svg(lat))?;
        files.push(p);
    }
    let md = dir.join("REPORT.md");
    std::fs::write(&md, markdown(results))?;
    files.push(md);
    Ok(files)
}

/// Writes `dir`/summary.json: `results` without the raw samples, one table row a line.
pub fn write_summary(results: &Results, dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join("summary.json");
    let value = serde_json::to_value(summary(results)).expect("json");
    std::fs::write(&path, rows_per_line(&value, 0) + "\n")?;
    Ok(path)
}

/// `results` with every per-run sample dropped: the medians, percentiles and counts remain.
pub fn summary(results: &Results) -> Results {
    let mut s = results.clone();
    if let Some(dp) = &mut s.datapath {
        dp.rows.iter_mut().for_each(|row| row.samples.clear());
    }
    if let Some(t) = &mut s.tiers {
        t.rows.iter_mut().for_each(|row| row.samples.clear());
    }
    if let Some(fl) = &mut s.flood {
        fl.runs.clear();
        fl.tcp.iter_mut().for_each(|t| t.samples.clear());
        if let Some(rates) = &mut fl.rates {
            rates.summary.iter_mut().for_each(|x| x.samples.clear());
        }
    }
    if let Some(lat) = &mut s.latency {
        lat.rows.iter_mut().for_each(|row| row.samples_ms.clear());
    }
    if let Some(at) = &mut s.attach {
        at.rows.iter_mut().for_each(|row| row.samples_ms.clear());
    }
    s
}

/// JSON with objects spread over lines down to the tables, and each table row on one line:
/// small, and a new run's diff shows which rows changed.
fn rows_per_line(v: &serde_json::Value, depth: usize) -> String {
    let indent = "  ".repeat(depth + 1);
    let close = "  ".repeat(depth);
    match v {
        serde_json::Value::Object(map) if depth < 2 => {
            let fields: Vec<String> =
                map.iter().map(|(k, x)| format!("{indent}{}: {}", serde_json::Value::from(k.as_str()), rows_per_line(x, depth + 1))).collect();
            format!("{{\n{}\n{close}}}", fields.join(",\n"))
        }
        serde_json::Value::Array(items) if items.iter().any(serde_json::Value::is_object) => {
            let rows: Vec<String> = items.iter().map(|x| format!("{indent}{x}")).collect();
            format!("[\n{}\n{close}]", rows.join(",\n"))
        }
        other => other.to_string(),
    }
}

fn machine_line(m: &Machine) -> String {
    format!("{}, {} cores, Linux {}, {:.0} GiB, {}", m.cpu_model, m.cores, m.kernel, m.memory_gib, m.virtualization)
}

fn flood_get(fl: &flood::Results, v: Variant, rules: usize, kind: Kind) -> Option<&flood::Summary> {
    flood_get_fam(fl, v, rules, kind, false)
}

fn flood_get_fam(fl: &flood::Results, v: Variant, rules: usize, kind: Kind, v6: bool) -> Option<&flood::Summary> {
    fl.summary.iter().find(|s| s.variant == v && s.v6 == v6 && s.rules == rules && s.kind == kind)
}

/// The headline tables (also the README section).
fn headline(r: &Results) -> String {
    let mut s = String::new();
    if let Some(fl) = r.flood.as_ref().filter(|f| !f.rules.is_empty()) {
        // 1,000 rules, the comparison the earlier reports made; else the largest count.
        let rules = if fl.rules.contains(&1_000) { 1_000 } else { fl.rules.iter().copied().max().unwrap_or(0) };
        let _ = writeln!(s, "UDP flood pod to pod over veth, 64-byte frames, {} rules: packets per second handled (delivered, or dropped for the denied flood), as a ratio to no enforcement (median of per-round ratios, variants interleaved in one run), and busy CPU of the machine per packet:\n", thousands(rules));
        let _ = writeln!(s, "| | no enforcement | policy-ebpf | iptables | iptables + ipset | nftables set | nftables linear |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        for kind in Kind::ALL {
            let mut row = format!("| {} |", kind.label());
            for v in Variant::ALL {
                let cell = flood_get(fl, v, rules, kind).map_or("-".to_owned(), |x| {
                    if v == Variant::None { pps(x.pps) + "pps" } else { ratio(x.ratio) }
                });
                let _ = write!(row, " {cell} |");
            }
            let _ = writeln!(s, "{row}");
        }
        let mut row = "| CPU ns per denied packet |".to_owned();
        for v in Variant::ALL {
            let _ = write!(row, " {} |", flood_get(fl, v, rules, Kind::Denied).map_or("-".into(), |x| ns(x.cpu_ns_per_packet)));
        }
        let _ = writeln!(s, "{row}");
        if let (Some(n), Some(b)) = (fl.tcp.iter().find(|t| t.variant == Variant::None), fl.tcp.iter().find(|t| t.variant == Variant::Bpf)) {
            let _ = writeln!(s, "| TCP throughput (iperf3) | {:.1} Gbit/s | {} | | | | |", n.gbits, ratio(b.ratio));
        }
        if let Some(rates) = &fl.rates {
            for test in [crr::Test::ConnectRate, crr::Test::RequestResponseMany] {
                let mut row = format!("| TCP {}, {} rules |", test.label(), thousands(rates.rules));
                for v in Variant::ALL {
                    let cell = rates.get(v, test).map_or("-".to_owned(), |x| if v == Variant::None { format!("{:.0}/s", x.per_sec) } else { ratio(x.ratio) });
                    let _ = write!(row, " {cell} |");
                }
                let _ = writeln!(s, "{row}");
            }
        }
        let _ = writeln!(s);
    }
    if let Some(dp) = &r.datapath {
        let lo = dp.rows.iter().map(|x| x.entries).min().unwrap_or(0);
        let hi = dp.rows.iter().map(|x| x.entries).max().unwrap_or(0);
        let _ = writeln!(s, "Classifier cost per packet (BPF_PROG_TEST_RUN, ns above the empty-program floor of {} ns), IPv4 / IPv6:\n", ns(dp.floor_repeat_ns));
        let _ = writeln!(s, "| Path | {} entries | {} entries | {}/{} |", thousands(lo), thousands(hi), thousands(hi), thousands(lo));
        let _ = writeln!(s, "|---|---|---|---|");
        for path in PATHS {
            let g = |fam: &str, n: usize| dp.get(fam, n, path).map_or(f64::NAN, |x| x.net_ns);
            let _ = writeln!(
                s,
                "| {path} | {} / {} | {} / {} | {} / {} |",
                ns(g("IPv4", lo)), ns(g("IPv6", lo)), ns(g("IPv4", hi)), ns(g("IPv6", hi)),
                ratio(g("IPv4", hi) / g("IPv4", lo)), ratio(g("IPv6", hi) / g("IPv6", lo))
            );
        }
        let _ = writeln!(s);
    }
    let mut cp = Vec::new();
    if let Some(c) = r.compile.iter().max_by_key(|c| (c.pods, c.policies)) {
        cp.push(format!("| Compile {} pods, {} policies (one node's maps) | {:.0} ms, peak {} |", thousands(c.pods), thousands(c.policies), c.compile_ms, mib(c.peak_kib)));
    }
    if let Some(l) = &r.latency {
        for row in l.rows.iter().filter(|x| x.expect == "drop" || x.change.contains("joins")) {
            cp.push(format!("| Manifest change to enforcement: {} | p50 {:.0} ms, p99 {:.0} ms |", row.change, row.p50_ms, row.p99_ms));
        }
    }
    if let Some(at) = &r.attach {
        for row in &at.rows {
            cp.push(format!("| {} to {} | p50 {:.1} ms, p99 {:.1} ms |", row.event, row.until, row.p50_ms, row.p99_ms));
        }
    }
    if let Some(rss) = &r.rss {
        cp.push(format!("| Agent RSS at rest, {} pods (all but {} on other nodes), {} policies | {} |", thousands(rss.pods + rss.local_pods), rss.local_pods, thousands(rss.policies), mib(rss.rss_kib)));
    }
    if !cp.is_empty() {
        let _ = writeln!(s, "| Control plane | |\n|---|---|");
        for line in cp {
            let _ = writeln!(s, "{line}");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "Measured on {} ({}, commit {}).", machine_line(&r.machine), r.machine.date, r.machine.git_commit);
    s
}

fn markdown(r: &Results) -> String {
    let mut s = String::new();
    intro_section(&mut s, r);
    if let Some(dp) = &r.datapath {
        datapath_section(&mut s, dp);
    }
    if let Some(sc) = &r.scale {
        scale_section(&mut s, sc);
    }
    if let Some(t) = &r.tiers {
        tiers_section(&mut s, t);
    }
    if let Some(fl) = &r.flood {
        if !fl.rules.is_empty() || !fl.rules6.is_empty() {
            flood_section(&mut s, fl);
        }
        if !fl.tcp.is_empty() || fl.rates.is_some() {
            let _ = writeln!(s, "## 3. TCP pod to pod\n");
        }
        if !fl.tcp.is_empty() {
            tcp_section(&mut s, fl);
        }
        if let Some(rates) = &fl.rates {
            rates_section(&mut s, rates);
        }
    }
    if !r.compile.is_empty() || r.latency.is_some() || r.rss.is_some() || r.attach.is_some() {
        let _ = writeln!(s, "## 4. Control plane\n");
    }
    if !r.compile.is_empty() {
        compile_section(&mut s, &r.compile);
    }
    if let Some(l) = &r.latency {
        latency_section(&mut s, l);
    }
    if let Some(at) = &r.attach {
        attach_section(&mut s, at);
    }
    if let Some(rss) = &r.rss {
        rss_section(&mut s, rss);
    }
    caveats_section(&mut s, r);
    s
}

/// Title, how the run was made, the machine, failed parts, the headline.
fn intro_section(s: &mut String, r: &Results) {
    let m = &r.machine;
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench{}` in {:.0} s. Every comparison below was measured side by side in this run; numbers are medians over repeated runs and are printed, not asserted.\n",
        if r.quick { " --quick" } else { "" },
        r.run_secs
    );
    if r.quick {
        let _ = writeln!(s, "**Quick mode**: fewer and shorter runs; expect more noise than a full run.\n");
    }
    let _ = writeln!(s, "## Machine\n\n| | |\n|---|---|");
    let _ = writeln!(s, "| CPU | {} |\n| Cores | {} |\n| Kernel | {} |\n| Memory | {:.1} GiB |\n| Virtualization | {} |\n| BPF JIT | {} |\n| Commit | {} |\n| Date | {} |\n", m.cpu_model, m.cores, m.kernel, m.memory_gib, m.virtualization, m.bpf_jit, m.git_commit, m.date);
    if !r.failures.is_empty() {
        let _ = writeln!(s, "**Failed parts** (not in this report): {}\n", r.failures.join("; "));
    }
    let _ = writeln!(s, "## Headline\n\n{}", headline(r));
    goals_section(s, r);
}

/// One row of the goals table: what, target, figure, met, and (missed) what bounds it.
struct Goal {
    what: String,
    target: String,
    figure: String,
    met: Option<bool>,
    bound: String,
}

/// The issue's goals, each met or missed with the figure from this run.
fn goals_section(s: &mut String, r: &Results) {
    let mut goals = testrun_goals(r);
    if let Some(fl) = &r.flood {
        goals.extend(flood_goals(r, fl));
    }
    if goals.is_empty() {
        return;
    }
    let _ = writeln!(s, "## Goals\n");
    let _ = writeln!(s, "Each measured in this run (a goal whose part did not run says so).\n");
    let _ = writeln!(s, "| Goal | Target | This run | | What bounds it |\n|---|---|---|---|---|");
    for g in goals {
        let verdict = match g.met { Some(true) => "**met**", Some(false) => "**missed**", None => "not measured" };
        let _ = writeln!(s, "| {} | {} | {} | {verdict} | {} |", g.what, g.target, g.figure, if g.met == Some(false) { g.bound.as_str() } else { "" });
    }
    let _ = writeln!(s);
}

/// TEST_RUN above the floor at 100,000 entries: the hot-key figure of section 1 plus the
/// random-peer miss penalty of section 1b (random - hot per call) when both ran.
fn testrun_goals(r: &Results) -> Vec<Goal> {
    const N: usize = 100_000;
    let hot = |path: &str| r.datapath.as_ref().and_then(|d| d.get("IPv4", N, path)).map(|x| x.net_ns);
    let miss = |path: &str| r.scale.as_ref().and_then(|sc| sc.get(N, path)).map(|x| (x.net_ns - x.hot_net_ns).max(0.0));
    let scale_at = |path: &str, n: usize| r.scale.as_ref().and_then(|sc| sc.get(n, path)).map(|x| x.net_ns);
    if r.datapath.is_none() && r.scale.is_none() {
        return Vec::new();
    }
    let not_iso = hot("not isolated").unwrap_or(f64::NAN);
    let denied = hot("denied").unwrap_or(f64::NAN);
    let mut out = Vec::new();
    for (path, target) in [("established", 40.0), ("new allowed", 250.0), ("denied", 100.0)] {
        let (figure, value) = match (hot(path), miss(path)) {
            (Some(h), Some(m)) => (format!("{} ns with random peers ({} ns for one hot peer, + {} ns of cache misses)", ns(h + m), ns(h), ns(m)), Some(h + m)),
            (Some(h), None) => (format!("{} ns (one hot peer; the `scale` part did not run)", ns(h)), Some(h)),
            (None, Some(_)) => (format!("{} ns per call with random peers (section 1b; section 1 did not run)", ns(scale_at(path, N).unwrap_or(f64::NAN))), scale_at(path, N)),
            (None, None) => ("-".into(), None),
        };
        let bound = match path {
            "established" => format!("parse and the endpoint lookup alone (not isolated) cost {} ns; the other {} ns are the conntrack lookup (a 44-byte key for IPv4 too) and the per-packet work on a hit (entry refresh, counters)", ns(not_iso), ns(hot(path).unwrap_or(f64::NAN) - not_iso)),
            "new allowed" => format!("the same lookups without the insert (the denied path) cost {} ns; the other {} ns are mostly the conntrack insert; at 1,000,000 entries with random peers: {} ns", ns(denied), ns(hot(path).unwrap_or(f64::NAN) - denied), ns(scale_at(path, 1_000_000).unwrap_or(f64::NAN))),
            _ => format!("{} ns above the not-isolated path for the ipcache lookup and two policy lookups (and the drop's event and counters); at 1,000,000 entries with random peers: {} ns (misses in the ipcache and policy hashes)", ns(denied - not_iso), ns(scale_at(path, 1_000_000).unwrap_or(f64::NAN))),
        };
        out.push(Goal { what: format!("TEST_RUN {path}, 100,000 entries, above the floor"), target: format!("<= {target:.0} ns"), figure, met: value.map(|v| v <= target), bound });
    }
    out
}

/// One allowed flow >= 0.97x at every rule count; policy-ebpf ahead of every netfilter
/// variant on every flood row and on connection rate.
fn flood_goals(r: &Results, fl: &flood::Results) -> Vec<Goal> {
    let mut out = Vec::new();
    let rows: Vec<&flood::Summary> = fl.summary.iter().filter(|x| x.variant == Variant::Bpf && x.kind == Kind::Allowed).collect();
    if !rows.is_empty() {
        let fam = |x: &flood::Summary| if x.v6 { "IPv6 " } else { "" };
        let figure = rows.iter().map(|x| format!("{}{}: {}", fam(x), thousands(x.rules), ratio(x.ratio))).collect::<Vec<_>>().join(", ");
        let worst = rows.iter().min_by(|a, b| a.ratio.total_cmp(&b.ratio)).expect("rows");
        let per_packet = 1e9 / (worst.pps / worst.ratio);
        let est = r.datapath.as_ref().and_then(|d| d.get(if worst.v6 { "IPv6" } else { "IPv4" }, 100_000, "established")).map_or(f64::NAN, |x| x.net_ns);
        let not_iso = r.datapath.as_ref().and_then(|d| d.get(if worst.v6 { "IPv6" } else { "IPv4" }, 100_000, "not isolated")).map_or(f64::NAN, |x| x.net_ns);
        let bound = format!("at {}{} rules policy-ebpf added {} ns per packet; 0.97x leaves 3% of no enforcement's {} ns per packet = {} ns for both hooks a forwarded packet passes (from_pod on `a`'s veth: the not-isolated path, {} ns in TEST_RUN; to_pod on `b`'s: the established path, {} ns)", fam(worst), thousands(worst.rules), ns(worst.added_ns), ns(per_packet), ns(per_packet * 0.03), ns(not_iso), ns(est));
        out.push(Goal { what: "one allowed flow vs no enforcement, every rule count".into(), target: ">= 0.97x".into(), figure, met: Some(rows.iter().all(|x| x.ratio >= 0.97)), bound });
    }
    let mut behind = Vec::new();
    let mut bounds = Vec::new();
    let mut compared = 0;
    for b in fl.summary.iter().filter(|x| x.variant == Variant::Bpf) {
        for x in fl.summary.iter().filter(|x| x.variant != Variant::None && x.variant != Variant::Bpf && x.v6 == b.v6 && x.rules == b.rules && x.kind == b.kind) {
            compared += 1;
            // Each ratio is paired with the no-enforcement run of its own round, so drift
            // between rounds on a shared machine cancels; compare those.
            if x.ratio >= b.ratio {
                let row = format!("{}{} rules, {}", if b.v6 { "IPv6 " } else { "" }, thousands(b.rules), b.kind.label());
                behind.push(format!("{row}: {} {} vs policy-ebpf {} of none", x.variant.short(), ratio(x.ratio), ratio(b.ratio)));
                bounds.push(format!("{row}: policy-ebpf {} ns per packet over no enforcement, {} {} ns", ns(b.added_ns), x.variant.short(), ns(x.added_ns)));
            }
        }
    }
    if compared > 0 {
        let figure = if behind.is_empty() { format!("ahead in all {compared} comparisons (ratios to no enforcement, paired per round)") } else { format!("behind or level in {} of {compared}: {}", behind.len(), behind.join("; ")) };
        let more = if bounds.len() > 4 { format!("; and {} more rows", bounds.len() - 4) } else { String::new() };
        bounds.truncate(4);
        let bound = format!("{}{more} (the classifier runs on both veths of a forwarded packet; one rule or one set lookup in netfilter's forward hook costs as much; rows within a few % are within this machine's noise)", bounds.join("; "));
        out.push(Goal { what: "policy-ebpf ahead of every netfilter variant, every flood row (a timed-out variant is not compared)".into(), target: "ahead".into(), figure, met: Some(behind.is_empty()), bound });
    }
    if let Some(rates) = &fl.rates {
        let test = crr::Test::ConnectRate;
        if let Some(b) = rates.get(Variant::Bpf, test) {
            let others: Vec<&crr::Summary> = rates.summary.iter().filter(|x| x.test == test && x.variant != Variant::None && x.variant != Variant::Bpf).collect();
            let figure = format!("policy-ebpf {:.0}/s, {} of none; {}", b.per_sec, ratio(b.ratio), others.iter().map(|x| format!("{} {}", x.variant.short(), ratio(x.ratio))).collect::<Vec<_>>().join(", "));
            let new_flow = r.datapath.as_ref().and_then(|d| d.get("IPv4", 100_000, "new allowed")).map_or(f64::NAN, |x| x.net_ns);
            let bound = format!("a connection passes the classifier about 8 times (4 packets each way through two hooks), among them two new flows (SYN, SYN-ACK: the new-allowed path, {} ns in TEST_RUN, with its conntrack insert)", ns(new_flow));
            out.push(Goal { what: format!("policy-ebpf ahead on connection rate (TCP_CRR, {} rules)", thousands(rates.rules)), target: "ahead of every netfilter variant".into(), figure, met: Some(others.iter().all(|x| x.ratio < b.ratio)), bound });
        }
    }
    out
}

/// 1. The classifier per packet (BPF_PROG_TEST_RUN).
fn datapath_section(s: &mut String, dp: &datapath::Results) {
    let _ = writeln!(s, "## 1. Datapath: per-packet cost (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(s, "The real classifier (`to_pod`, a pod isolated for ingress) on crafted 64-byte TCP frames (IPv6: 74 bytes). At each size N the maps hold N identities, each with an IPv4 and an IPv6 address in `{}` (2N entries), N exact-port allow entries in `{}` (spread over 64 endpoints and 1,000 ports; the pod's lookup mask lists exact entries for its peers and the node's any-protocol entry, as the compiler writes it for such a pod) and N live `{}` entries; the measured peer is entry N/2. Flow-log settings are the agent's defaults (events for drops, at most 1,000 per second per CPU).\n", map_name::ADDRESSES, map_name::POLICY, map_name::CONNTRACK);
    let _ = writeln!(s, "* **established**: a packet of a tracked flow (conntrack hit); **denied**: a new flow no entry allows (an address lookup and two policy lookups: the peer's exact entry and the wildcard identity's any-protocol entry; dropped, never tracked); **not isolated**: the pod has no policy (one endpoint lookup). These three keep no state between runs, so TEST_RUN repeats the same packet {} times, {} times per path; the kernel reports the mean per run and the table shows the median of those means.", thousands(dp.repeat as usize), dp.runs);
    let _ = writeln!(s, "* **new allowed**: the first packet of an allowed flow (ipcache lookup, policy lookup, conntrack insert). TEST_RUN would turn it into an established flow after one run, so it is measured per call instead: {} distinct SYNs (a new source port each) with repeat = 1, interleaved with an empty-program call and an established-packet call timed the same way; the table shows the median single run minus the median empty-program single run. The created conntrack entries are removed before the next size.", thousands(dp.new_flow_calls));
    let _ = writeln!(s, "* The floor, an empty SCHED_CLS program (`r0 = 0; exit`, loaded with the raw bpf(2) syscall) run on the same frames, was {} ns per run with repeat and {} ns per single call (timer included); it is subtracted in the same mode.", ns(dp.floor_repeat_ns), ns(dp.floor_per_call_ns));
    let check = |fam: &str| -> Option<String> {
        let n = dp.rows.iter().map(|x| x.entries).max()?;
        let a = dp.get(fam, n, "established")?.net_ns;
        let b = dp.get(fam, n, "established (per-call check)")?.net_ns;
        Some(format!("{fam} established at {} entries: {} ns with repeat, {} ns per call", thousands(n), ns(a), ns(b)))
    };
    let _ = writeln!(s, "* Cross-check of the per-call method: {}.\n", [check("IPv4"), check("IPv6")].into_iter().flatten().collect::<Vec<_>>().join("; "));
    let sizes: Vec<usize> = {
        let mut v: Vec<usize> = dp.rows.iter().map(|x| x.entries).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let _ = writeln!(s, "ns per packet above the floor (median):\n");
    let mut head = "| Family | Path |".to_owned();
    let mut sep = "|---|---|".to_owned();
    for n in &sizes {
        let _ = write!(head, " {} |", thousands(*n));
        sep += "---|";
    }
    let _ = writeln!(s, "{head} {}/{} |\n{sep}---|", thousands(*sizes.last().unwrap_or(&0)), thousands(*sizes.first().unwrap_or(&0)));
    for fam in ["IPv4", "IPv6"] {
        for path in PATHS.iter().copied().chain(["established (per-call check)"]) {
            let mut row = format!("| {fam} | {path} |");
            for n in &sizes {
                let _ = write!(row, " {} |", dp.get(fam, *n, path).map_or("-".into(), |x| ns(x.net_ns)));
            }
            let first = dp.get(fam, sizes[0], path).map_or(f64::NAN, |x| x.net_ns);
            let last = dp.get(fam, *sizes.last().unwrap_or(&0), path).map_or(f64::NAN, |x| x.net_ns);
            let _ = writeln!(s, "{row} {} |", ratio(last / first));
        }
    }
    let _ = writeln!(s, "\nWith the floor included (what TEST_RUN reports), IPv4: {}.\n", PATHS.iter().map(|p| {
        let v: Vec<String> = sizes.iter().map(|n| dp.get("IPv4", *n, p).map_or("-".into(), |x| ns(x.ns))).collect();
        format!("{p} {}", v.join(" / "))
    }).collect::<Vec<_>>().join("; "));
    let _ = writeln!(s, "![per-packet cost](datapath.svg)\n");
}

/// 2. UDP floods over veth, every variant.
fn flood_section(s: &mut String, fl: &flood::Results) {
    let _ = writeln!(s, "## 2. Real packets: UDP flood over veth\n");
    let _ = writeln!(s, "Pod `a` sends 64-byte UDP frames (sendmmsg, batches of 64, one sending thread, a raw socket so the UDP ports can change per packet) to pod `b` through a node namespace that forwards between the two host-side veths; {:.1} s per run, {} rounds, the runs of all variants interleaved round by round. Each variant has its own node and pods, built identically. `b` is isolated for ingress and allows N rules: N - 1 (peer /32, UDP port) pairs of peers that send nothing, and `a` on UDP 10000-10999 (one rule, last in linear chains). `b` has UDP sockets on every target port with tiny receive buffers (what arrives is delivered and dropped there, no ICMP). Delivered = packets transmitted on `b`'s host-side veth; CPU = busy time of the whole machine from /proc/stat per packet sent (forwarding runs in the sender's softirq).\n", fl.seconds_per_run, fl.rounds);
    let _ = writeln!(s, "* **policy-ebpf**: the classifier on both host-side veths (`policy-agent attach`), entries written into the pinned maps.");
    let _ = writeln!(s, "* **iptables** ({}; x_tables, as kube-router-style chains run): `FORWARD -o <b's veth> -j POD-B-IN`; `POD-B-IN`: `--ctstate RELATED,ESTABLISHED -j ACCEPT`, one `-s PEER/32 -p udp --dport PORT -j ACCEPT` per rule, `-j DROP`.", fl.iptables_binary);
    let _ = writeln!(s, "* **iptables + ipset**: the same chain with one `-m set --match-set pod-b-in src,dst -j ACCEPT` over a `hash:ip,port` set (the 10000-10999 range is 1,000 set elements).");
    let _ = writeln!(s, "* **nftables set**: a `forward` hook chain jumping to a per-pod chain: `ct state established,related accept`, `ip saddr . udp dport @pod_b_in accept` (a hash set of concatenations, the range as 1,000 elements), `drop`.");
    let _ = writeln!(s, "* Flows: **allowed, one flow** repeats one 5-tuple: for policy-ebpf that is its established path (a conntrack hit); the netfilter variants see a UDP flow with no replies, which conntrack never marks ESTABLISHED, so every packet walks the rules. **allowed, new flow per packet** changes the source port (and, every 64,512 packets, the destination port) on every packet, so every packet is a new flow everywhere: policy-ebpf does its full lookup and a conntrack insert (until the pod's conntrack budget is spent; after that a new flow passes on its policy lookup without an entry), netfilter creates a conntrack entry (up to nf_conntrack_max = {}, then early drop). **denied** goes to UDP 5002, which no rule allows (no variant tracks a dropped flow). With no enforcement the denied flood is delivered to `b` (routing, a socket lookup, a full receive buffer), so a drop at the veth can be cheaper than delivery: a ratio above 1 there means the drop costs less than delivering; compare the enforcing variants with each other (the \"vs policy-ebpf\" column).\n", thousands(fl.nf_conntrack_max as usize));
    let _ = writeln!(s, "* **nftables linear**: the same per-pod chain with one `ip saddr PEER udp dport PORT accept` rule per pair instead of the set.");
    let _ = writeln!(s, "* Every netfilter variant also accepts `a` on TCP {} (the connection-rate server; one rule after the UDP one, or one more set element). **IPv6** floods (84-byte frames: the same 22-byte payload) use the pods' IPv6 addresses, ip6tables (ip6tables-legacy-restore), `hash:ip,port family inet6`, an `ip6 saddr` set or rules in a table of their own, and the same identities for policy-ebpf (each filler peer gets an IPv6 address in the ipcache); the IPv4 netfilter rules are removed before the IPv6 floods.", flood::CRR_PORT);
    let _ = writeln!(s, "* Rules are loaded in one batch per variant (`iptables-restore`, `ipset restore`, `nft -f`, or map writes); each variant gets {:.0} s to install a rule count. A variant that takes longer is stopped and reported as **timed out** at that count and every larger one; measuring is bounded by time per run in every case.\n", fl.budget_secs);
    let installs: Vec<String> = fl.installs.iter().filter(|i| i.variant != Variant::None).map(|i| format!("{} {}{} {}", i.variant.short(), thousands(i.rules), if i.v6 { " (IPv6)" } else { "" }, if i.timed_out { "timed out".to_owned() } else { format!("{:.1} s", i.secs) })).collect();
    if !installs.is_empty() {
        let _ = writeln!(s, "Install times: {}.\n", installs.join(", "));
    }
    for (v6, counts) in [(false, &fl.rules), (true, &fl.rules6)] {
        for &rules in counts {
            flood_table(s, fl, rules, v6);
        }
    }
    let bad: Vec<String> = fl
        .summary
        .iter()
        .filter(|x| x.variant != Variant::None && ((x.kind == Kind::Denied && x.delivered_fraction > 0.01) || (x.kind != Kind::Denied && x.delivered_fraction < 0.5)))
        .map(|x| format!("{} / {} / {} rules ({:.1}% delivered)", x.variant.label(), x.kind.label(), x.rules, x.delivered_fraction * 100.0))
        .collect();
    if bad.is_empty() {
        let _ = writeln!(s, "Sanity: every enforcing variant delivered the allowed floods and dropped the denied one.\n");
    } else {
        let _ = writeln!(s, "**Check these rows** (a denied flood got through, or an allowed one mostly did not): {}.\n", bad.join("; "));
    }
    let _ = writeln!(s, "![UDP flood](flood.svg)\n");
}

/// One rule count's flood table; a variant out of its install budget gets one line.
fn flood_table(s: &mut String, fl: &flood::Results, rules: usize, v6: bool) {
    let _ = writeln!(s, "### {} rules, {}\n", thousands(rules), if v6 { "IPv6" } else { "IPv4" });
    let _ = writeln!(s, "| Flood | Variant | packets/s handled | vs none | vs policy-ebpf | added ns/packet | CPU ns/packet | sender CPU ns/packet | delivered |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for kind in Kind::ALL {
        for v in Variant::ALL {
            if let Some(x) = flood_get_fam(fl, v, rules, kind, v6) {
                let bpf = flood_get_fam(fl, Variant::Bpf, rules, kind, v6).map_or(f64::NAN, |b| x.pps / b.pps);
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1}% |",
                    kind.label(), v.label(), pps(x.pps), ratio(x.ratio), ratio(bpf),
                    if v == Variant::None { "-".into() } else { ns(x.added_ns) },
                    ns(x.cpu_ns_per_packet), ns(x.sender_cpu_ns_per_packet), x.delivered_fraction * 100.0
                );
            } else if fl.timed_out(v, rules, v6) {
                let _ = writeln!(s, "| {} | {} | timed out (budget {:.0} s) | | | | | | |", kind.label(), v.label(), fl.budget_secs);
            }
        }
    }
    let _ = writeln!(s);
}

/// 3. Connection and request-response rates.
fn rates_section(s: &mut String, r: &crr::Results) {
    let _ = writeln!(s, "### Connection rate and request-response rate\n");
    let _ = writeln!(s, "Through the flood topologies (pod `a` -> veth -> node namespace -> veth -> pod `b`) with {} IPv4 rules installed in every variant, a server in `b` on TCP {} (worker threads blocking in accept, answering each byte with one byte) and clients in `a` written in Rust (std threads, TCP_NODELAY): **TCP_CRR**: {} client threads, each in a loop of connect, 1-byte request, 1-byte response, close (the client closes first; `tcp_tw_reuse` in `a`); **TCP_RR**: one connection doing 1-byte ping-pong, and {} connections doing so at once. {} s per test, variant and round after a {} s warm-up, {} rounds, variants one after another within a round; the ratio is the median of per-round ratios to no enforcement. A new connection costs each netfilter variant its rule walk (and a conntrack entry), and policy-ebpf its full lookup and conntrack insert; a request-response packet is an established packet everywhere.\n", thousands(r.rules), flood::CRR_PORT, r.crr_clients, r.rr_connections, r.secs, r.warmup_secs, r.rounds);
    let _ = writeln!(s, "| Test | Variant | per second | vs none | vs policy-ebpf | errors |\n|---|---|---|---|---|---|");
    for test in crr::Test::ALL {
        for v in Variant::ALL {
            if let Some(x) = r.get(v, test) {
                let bpf = r.get(Variant::Bpf, test).map_or(f64::NAN, |b| x.per_sec / b.per_sec);
                let _ = writeln!(s, "| {} | {} | {:.0} | {} | {} | {} |", test.label(), v.label(), x.per_sec, ratio(x.ratio), ratio(bpf), x.errors);
            }
        }
    }
    let _ = writeln!(s);
}

/// 1b. TEST_RUN at scale with random peers.
fn scale_section(s: &mut String, sc: &scale::Results) {
    let _ = writeln!(s, "## 1b. Datapath at scale, random peers (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(s, "The same classifier, loaded with maps sized for the largest count (conntrack capacity {}), IPv4. At each size N the maps hold N identities with an address each, N allow entries (one endpoint, the peer's port) and N live conntrack entries. A pool of {} frames from peers drawn at random (with repetition) over all N entries runs in turn, one TEST_RUN call per frame (repeat = 1, so nothing stays warm between a peer's calls but what the rest of the pool leaves), each call next to the empty program on the same frame; the table shows the median over {} passes of the pool's mean kernel-reported duration minus the empty program's mean (the per-call floor, timer included, was {} ns). **established**: ACKs of the pool's flows (opened by one SYN each through the classifier beforehand); **new allowed**: SYNs on a source port no flow uses (one insert each; removed after the size); **denied**: SYNs to TCP {} (an ipcache lookup and the policy lookups, dropped); **not isolated**: the pod without policy. The second figure in each cell is the same measurement with every frame from one peer (a hot key): the difference is what cache misses on the maps cost.\n", thousands(sc.conntrack_capacity as usize), thousands(sc.pool), sc.passes, ns(median_floor(sc)), datapath::DENIED_PORT);
    let mut sizes: Vec<usize> = sc.rows.iter().map(|r| r.entries).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut head = "| Path (ns per call above the floor: random peers / one hot peer) |".to_owned();
    let mut sep = "|---|".to_owned();
    for n in &sizes {
        let _ = write!(head, " {} |", thousands(*n));
        sep += "---|";
    }
    let _ = writeln!(s, "{head}\n{sep}");
    for path in PATHS {
        let mut row = format!("| {path} |");
        for n in &sizes {
            let _ = write!(row, " {} |", sc.get(*n, path).map_or("-".into(), |x| format!("{} / {}", ns(x.net_ns), ns(x.hot_net_ns))));
        }
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(s, "\nPer call, TEST_RUN's own overhead (skb setup around one run) is not all in the empty program's floor: compare with section 1's repeat figures for a hot key, and read the random - hot difference as the cost of misses.\n");
}

/// 1c. A new flow with ClusterNetworkPolicy tiers and without.
fn tiers_section(s: &mut String, t: &tiers::Results) {
    let _ = writeln!(s, "## 1c. ClusterNetworkPolicy tiers: a new flow with and without (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(s, "`testbed::synthetic::synthetic_cluster({}, {})` compiled for `node-1` by `policy_agent::compile::compile` and `render` twice: with its NetworkPolicies only, and with the same plus {} ClusterNetworkPolicies ({}). Each result is loaded into a classifier of its own; both are loaded at once and timed in the same run. The measured packets are picked by the userspace model from the compiled entries, one per case, and each case sends the same packet (peer, pod, port) through both classifiers: the first TCP SYN of a flow (a new source port per call, so a conntrack miss every time; allowed ones are inserted), {} calls per case and configuration with repeat = 1, each next to the empty program on the same frame, in {} chunks in which the cases and the two configurations take turns (the two swap order every chunk). The table shows the median call minus the median of the empty program's calls interleaved with it (the per-call floor was {} ns), IPv4 `to_pod` (ingress).\n", thousands(t.pods), thousands(t.policies), t.cluster_policies.len(), t.cluster_policies.join(", "), thousands(t.calls), t.rounds, ns(t.floor_ns));
    let _ = writeln!(s, "The lookup mask is the endpoint's ingress `lookups` byte (bits 0-3: the peer's exact, port-block, protocol and any-protocol entries; 4-7 the same for the wildcard identity): the lookups a new flow may cost.\n");
    let _ = writeln!(s, "| Case | without tiers: verdict | mask | ns | with tiers: verdict (rule) | mask | ns | with / without |\n|---|---|---|---|---|---|---|---|");
    for case in t.cases() {
        let (Some(a), Some(b)) = (t.get(case, tiers::WITHOUT), t.get(case, tiers::WITH)) else { continue };
        let _ = writeln!(s, "| {case} | {} | {:#04x} | {} | {} ({}) | {:#04x} | {} | {} |", a.verdict, a.lookups, ns(a.net_ns), b.verdict, b.rule, b.lookups, ns(b.net_ns), ratio(b.net_ns / a.net_ns));
    }
    let _ = writeln!(s, "\nMap entries of the node, without / with tiers:\n");
    let _ = writeln!(s, "| | without tiers | with tiers |\n|---|---|---|");
    let (a, b) = (&t.without, &t.with);
    for (what, x, y) in [
        ("policy entries, allow", a.allow, b.allow),
        ("policy entries, deny", a.deny, b.deny),
        ("of which port blocks (LPM trie)", a.port_blocks, b.port_blocks),
        ("ipcache entries", a.ipcache, b.ipcache),
        ("local endpoints", a.endpoints, b.endpoints),
        ("endpoint directions judged", a.judged_directions, b.judged_directions),
    ] {
        let _ = writeln!(s, "| {what} | {} | {} |", thousands(x), thousands(y));
    }
    let _ = writeln!(s, "| compile | {:.1} ms | {:.1} ms |\n", a.compile_ms, b.compile_ms);
}

fn median_floor(sc: &scale::Results) -> f64 {
    super::median(&sc.rows.iter().map(|r| r.floor_ns).collect::<Vec<_>>())
}

/// 3. TCP throughput (iperf3).
fn tcp_section(s: &mut String, fl: &flood::Results) {
    let _ = writeln!(s, "### Throughput (iperf3)\n");
    let _ = writeln!(s, "One iperf3 stream `a` -> `b` for {} s per run, medians of {} runs; with the classifier `b` is isolated and allows `a` on the iperf3 port.\n", fl.tcp_seconds, fl.tcp.first().map_or(0, |t| t.samples.len()));
    let _ = writeln!(s, "| Variant | Gbit/s | vs none | runs |\n|---|---|---|---|");
    for t in &fl.tcp {
        let samples: Vec<String> = t.samples.iter().map(|x| format!("{x:.2}")).collect();
        let _ = writeln!(s, "| {} | {:.2} | {} | {} |", t.variant.label(), t.gbits, ratio(t.ratio), samples.join(", "));
    }
    let _ = writeln!(s);
}

/// 4. Compile time and memory.
fn compile_section(s: &mut String, compile: &[control::CompileResult]) {
    let _ = writeln!(s, "### Compile time and peak memory\n");
    let _ = writeln!(s, "`testbed::synthetic::synthetic_cluster` (namespaces of 100 pods, dual-stack, spread over 50 nodes; policies mixing default deny, pod and namespace selectors, matchExpressions, ipBlocks with except, named and ranged ports), compiled for one node. Each configuration runs in its own child process: RSS after building the state, then VmHWM reset (`/proc/self/clear_refs`) and read after compile, render and diff.\n");
    let _ = writeln!(s, "| Pods | Policies | compile (median) | min - max | render | diff from empty | state RSS | peak RSS | identities | local endpoints | policy entries |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for c in compile {
        let _ = writeln!(s, "| {} | {} | {:.1} ms | {:.1} - {:.1} ms | {:.1} ms | {:.1} ms | {} | {} | {} | {} | {} |", thousands(c.pods), thousands(c.policies), c.compile_ms, c.compile_ms_min, c.compile_ms_max, c.render_ms, c.diff_ms, mib(c.state_rss_kib), mib(c.peak_kib), thousands(c.identities), c.local_endpoints, thousands(c.policy_entries));
    }
    let _ = writeln!(s, "\n({} compiles per configuration.)\n", compile.first().map_or(0, |c| c.runs));
    changes_section(s, compile);
}

/// 4. One change compiled by the agent's incremental compiler, per configuration.
fn changes_section(s: &mut String, compile: &[control::CompileResult]) {
    let measured: Vec<&control::CompileResult> = compile.iter().filter(|c| !c.changes.is_empty()).collect();
    let Some(largest) = measured.iter().max_by_key(|c| (c.pods, c.policies)) else { return };
    let _ = writeln!(s, "### One change, compiled incrementally\n");
    let _ = writeln!(s, "The agent's `IncrementalCompiler`, primed with the configuration above, compiles the state after one change (median of 7; the state before is compiled back, untimed, between runs). Compile only: rendering the maps, the diff and the writes come after. \"Redone\" is what the change made it compute again; a change that makes or removes an identity (a new label set, a namespace relabel, a new ipBlock) resolves every identity and peer, as the full compile does.\n");
    let header: Vec<String> = measured.iter().map(|c| format!("{} pods, {} policies", thousands(c.pods), thousands(c.policies))).collect();
    let _ = writeln!(s, "| Change | {} | redone ({} pods, {} policies) |", header.join(" | "), thousands(largest.pods), thousands(largest.policies));
    let _ = writeln!(s, "|---|{}---|", "---|".repeat(header.len()));
    let full: Vec<String> = measured.iter().map(|c| format!("{:.1} ms", c.compile_ms)).collect();
    let _ = writeln!(s, "| (full compile) | {} | everything |", full.join(" | "));
    for (row, change) in largest.changes.iter().enumerate() {
        let cells: Vec<String> = measured.iter().map(|c| c.changes.get(row).map_or_else(|| "-".to_owned(), |x| format!("{:.1} ms", x.ms))).collect();
        let _ = writeln!(s, "| {} | {} | {} |", change.kind, cells.join(" | "), change.redone);
    }
    let _ = writeln!(s);
}

/// 4. Time from a manifest change to enforcement.
fn latency_section(s: &mut String, l: &control::LatencyResults) {
    let _ = writeln!(s, "### Time from a manifest change to enforcement\n");
    let _ = writeln!(s, "`policy-agent run --manifests DIR` in a node namespace with four pods, on top of a synthetic background of {} pods and {} policies on other nodes (one JSON file). Each change is a file written atomically (or removed); the clock starts just before, and pod `a` probes the affected pod with TCP connects until the verdict flips. A drop is dated at the start of the first probe that goes unanswered ({} ms timeout), an allow at the first completed connection ({} ms timeout, so allow times include up to that much waiting; a slower connect only delays an allow). The agent watches the directory with inotify. {} iterations of each change.\n", thousands(l.background_pods), thousands(l.background_policies), l.probe_timeout_ms, l.allow_probe_timeout_ms, l.rows.first().map_or(0, |x| x.samples_ms.len() + x.failures));
    let _ = writeln!(s, "| Change | Verdict becomes | p50 | p99 | max | samples | never flipped (10 s) |\n|---|---|---|---|---|---|---|");
    for row in &l.rows {
        let max = row.samples_ms.iter().copied().fold(f64::NAN, f64::max);
        let _ = writeln!(s, "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {} | {} |", row.change, row.expect, row.p50_ms, row.p99_ms, max, row.samples_ms.len(), row.failures);
    }
    let _ = writeln!(s, "\nThe agent's own `policy_enforcement_latency_seconds` (file change seen to maps written) averaged {:.0} ms over the run. Agent RSS after the run: {}.\n", l.agent_reported_mean_ms, mib(l.agent_rss_kib));
    let _ = writeln!(s, "![latency](latency.svg)\n");
}

/// 4. Time from a route or link change to the classifier being attached or detached.
fn attach_section(s: &mut String, at: &attach::AttachResults) {
    let _ = writeln!(s, "### Time from a pod's route to its classifier\n");
    let _ = writeln!(s, "`policy-agent run --manifests DIR --resync-ms {}` in a node namespace, with {} pods in the manifests and none of their interfaces yet: only the agent's netlink subscription can explain a reaction within the run. For each pod in turn: a veth is created and set up, {} ms pass (the agent handles those link events; the pod stays pending, no route), then its /32 route is added with `ip route add` and the clock starts when that command returns; the pod counts as attached when both of its links (TCX ingress and egress) are pinned in the bpffs, checked with a `stat` every {} µs. Then each veth is deleted with `ip link del`, timed until both of its pins are gone.\n", at.resync_ms, at.pods, at.settle_ms, at.poll_us);
    let _ = writeln!(s, "| Event | Until | p50 | p99 | max | samples | never (5 s) |\n|---|---|---|---|---|---|---|");
    for row in &at.rows {
        let _ = writeln!(s, "| {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} |", row.event, row.until, row.p50_ms, row.p99_ms, row.max_ms, row.samples_ms.len(), row.failures);
    }
    let _ = writeln!(s);
}

/// 4. Agent memory at rest.
fn rss_section(s: &mut String, rss: &control::RssResult) {
    let _ = writeln!(s, "### Agent memory at rest\n");
    let _ = writeln!(s, "The agent in a node namespace on a manifest directory with the synthetic {} pods (all on other nodes) and {} policies, plus {} local pods labelled so the synthetic policies select them. Ready (first sync done) after {:.1} s; after {:.0} s at rest: **RSS {}** (peak {}), {} identities, {} policy map entries.\n", thousands(rss.pods), thousands(rss.policies), rss.local_pods, rss.ready_secs, rss.rest_secs, mib(rss.rss_kib), mib(rss.hwm_kib), thousands(rss.identities as usize), thousands(rss.policy_entries as usize));
}

/// Caveats and the README section.
fn caveats_section(s: &mut String, r: &Results) {
    let m = &r.machine;
    let _ = writeln!(s, "## Caveats\n");
    let _ = writeln!(s, "* The machine may be shared; {} cores. TEST_RUN numbers are stable to a few ns; flood and latency numbers move with other load, which is why variants are interleaved and compared as ratios within one run.", m.cores);
    let _ = writeln!(s, "* Section 1's TEST_RUN keeps caches hot (same packet every run); section 1b (when it ran) draws peers at random over all entries, one call each, so misses show, but per call TEST_RUN adds overhead the empty program does not fully cancel: read its random - hot differences.");
    let _ = writeln!(s, "* One sender thread: flood numbers are per-core forwarding cost, not a node's capacity. Linear rule sets at 100,000 rules forward a few thousand packets per second; their runs are bounded by time, not by packets.");
    let _ = writeln!(s, "* The netfilter translations are hand-written equivalents of one pod's ingress policy, not the output of kube-router itself.\n");
    let _ = writeln!(s, "## README section (ready to paste)\n");
    let _ = writeln!(s, "```markdown\n## Performance\n\n{}\nReproduce with `cargo xtask bench` (root; about {} minutes; `--quick` for a two-minute smoke run). It installs iptables, ipset, nftables and iperf3 from Debian, builds in release, and writes [bench/REPORT.md](bench/REPORT.md) (method, every table, plots), `bench/summary.json` (the medians) and the SVGs; every raw sample goes to `target/bench/results.json`.\n```", headline(r), ((r.run_secs / 60.0).ceil() as u64).max(1));
}

// --- SVG ------------------------------------------------------------------------------------

const COLORS: [&str; 6] = ["#1b6ac9", "#d9480f", "#2b8a3e", "#862e9c", "#868e96", "#e67700"];

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn datapath_svg(dp: &datapath::Results) -> String {
    let (w, h, l, r, t, b) = (760.0, 420.0, 70.0, 230.0, 40.0, 50.0);
    let mut sizes: Vec<usize> = dp.rows.iter().map(|x| x.entries).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let (x0, x1) = ((*sizes.first().unwrap_or(&10) as f64).log10(), (*sizes.last().unwrap_or(&100_000) as f64).log10().max(1.1));
    let ymax = dp.rows.iter().filter(|x| PATHS.contains(&x.path.as_str())).map(|x| x.net_ns).fold(10.0, f64::max) * 1.15;
    let px = |n: usize| l + ((n as f64).log10() - x0) / (x1 - x0).max(1e-9) * (w - l - r);
    let py = |v: f64| h - b - v.max(0.0) / ymax * (h - t - b);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    let _ = writeln!(s, "<text x=\"{l}\" y=\"22\" font-size=\"14\">Classifier ns per packet above the floor (BPF_PROG_TEST_RUN) vs map entries</text>");
    for i in 0..=5 {
        let v = ymax / 5.0 * f64::from(i);
        let y = py(v);
        let _ = writeln!(s, "<line x1=\"{l}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e9ecef\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>", w - r, l - 6.0, y + 4.0);
    }
    for &n in &sizes {
        let x = px(n);
        let _ = writeln!(s, "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{t}\" y2=\"{}\" stroke=\"#e9ecef\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>", h - b, h - b + 18.0, thousands(n));
    }
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">policy entries and identities (log scale)</text>", l + (w - l - r) / 2.0, h - 8.0);
    let _ = writeln!(s, "<text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">ns</text>", t + (h - t - b) / 2.0);
    let mut ly = t + 10.0;
    for (i, path) in PATHS.iter().enumerate() {
        for (fam, dash) in [("IPv4", ""), ("IPv6", " stroke-dasharray=\"6 4\"")] {
            let pts: Vec<String> = sizes.iter().filter_map(|&n| dp.get(fam, n, path).map(|x| format!("{:.1},{:.1}", px(n), py(x.net_ns)))).collect();
            let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>", COLORS[i], pts.join(" "));
            let _ = writeln!(s, "<line x1=\"{}\" x2=\"{}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"{}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{:.1}\">{} {fam}</text>", w - r + 12.0, w - r + 40.0, COLORS[i], w - r + 46.0, ly + 4.0, esc(path));
            ly += 18.0;
        }
    }
    s += "</svg>\n";
    s
}

/// Grouped bars of `value` per group; `groups` = (label, [(series, value)]).
fn bars_svg(title: &str, ylabel: &str, series: &[&str], groups: &[(String, Vec<f64>)], reference: Option<f64>) -> String {
    let (w, h, l, r, t, b) = (900.0, 440.0, 70.0, 20.0, 60.0, 70.0);
    let ymax = groups.iter().flat_map(|g| g.1.iter().copied()).filter(|v| v.is_finite()).fold(reference.unwrap_or(0.0), f64::max) * 1.15 + 1e-9;
    let py = |v: f64| h - b - v.max(0.0) / ymax * (h - t - b);
    let gw = (w - l - r) / groups.len().max(1) as f64;
    let bw = gw * 0.8 / series.len().max(1) as f64;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    let _ = writeln!(s, "<text x=\"{l}\" y=\"20\" font-size=\"14\">{}</text>", esc(title));
    let mut lx = l;
    for (i, name) in series.iter().enumerate() {
        let _ = writeln!(s, "<rect x=\"{lx:.1}\" y=\"32\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"42\">{}</text>", COLORS[i % COLORS.len()], lx + 16.0, esc(name));
        lx += 22.0 + name.len() as f64 * 6.6;
    }
    for i in 0..=5 {
        let v = ymax / 5.0 * f64::from(i);
        let y = py(v);
        let _ = writeln!(s, "<line x1=\"{l}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e9ecef\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>", w - r, l - 6.0, y + 4.0, if ymax < 5.0 { format!("{v:.2}") } else { format!("{v:.0}") });
    }
    if let Some(rf) = reference {
        let y = py(rf);
        let _ = writeln!(s, "<line x1=\"{l}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#495057\" stroke-dasharray=\"4 3\"/>", w - r);
    }
    for (gi, (label, values)) in groups.iter().enumerate() {
        let gx = l + gw * gi as f64 + gw * 0.1;
        for (i, v) in values.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let x = gx + bw * i as f64;
            let _ = writeln!(s, "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}: {v:.3}</title></rect>", py(*v), bw * 0.92, h - b - py(*v), COLORS[i % COLORS.len()], esc(series.get(i).copied().unwrap_or("")));
        }
        for (li, part) in label.split('\n').enumerate() {
            let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", l + gw * (gi as f64 + 0.5), h - b + 16.0 + 14.0 * li as f64, esc(part));
        }
    }
    let _ = writeln!(s, "<text transform=\"translate(16 {}) rotate(-90)\" text-anchor=\"middle\">{}</text>", t + (h - t - b) / 2.0, esc(ylabel));
    s += "</svg>\n";
    s
}

fn flood_svg(fl: &flood::Results) -> String {
    let series: Vec<&str> = Variant::ALL.iter().skip(1).map(|v| v.label()).collect();
    let mut groups = Vec::new();
    for &rules in &fl.rules {
        for kind in Kind::ALL {
            let values = Variant::ALL.iter().skip(1).map(|&v| flood_get(fl, v, rules, kind).map_or(f64::NAN, |x| x.ratio)).collect();
            groups.push((format!("{} rules\n{}", thousands(rules), kind.label()), values));
        }
    }
    bars_svg("UDP flood: packets/s handled relative to no enforcement (dashed line = 1)", "ratio to no enforcement", &series, &groups, Some(1.0))
}

fn latency_svg(l: &control::LatencyResults) -> String {
    let groups: Vec<(String, Vec<f64>)> = l
        .rows
        .iter()
        .map(|r| {
            let short = r.change.split(" (").next().unwrap_or(&r.change).to_owned();
            (format!("{short}\n-> {}", r.expect), vec![r.p50_ms, r.p99_ms])
        })
        .collect();
    bars_svg("Manifest change to enforcement, measured by probing (ms)", "ms", &["p50", "p99"], &groups, None)
}
