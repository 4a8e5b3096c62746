//! The benchmarks behind `cargo xtask bench`: the classifier's per-packet cost through
//! BPF_PROG_TEST_RUN, UDP floods and TCP throughput over veths side by side with iptables,
//! ipset and nftables, and the control plane (compile time and memory, time to enforcement,
//! agent memory). Writes REPORT.md, summary.json (medians) and SVG plots to `--out`, and
//! every raw sample to `--raw`/results.json. Root only.
//!
//! Usage: bench --agent PATH [--quick] [--out DIR] [--raw DIR] [--only datapath,scale,tiers,flood,flood6,crr,control,attach]
//!        bench report RESULTS_JSON DIR             (rewrite the report in DIR from raw results)
//!        bench compile-child PODS POLICIES RUNS   (internal: one compile in a child)

use std::{path::PathBuf, process::ExitCode, time::{Duration, Instant}};

use testbed::bench::{self, attach, control, crr, datapath, flood, log, report, scale, tiers};

/// The parts `--only` accepts.
const PARTS: [&str; 8] = ["datapath", "scale", "tiers", "flood", "flood6", "crr", "control", "attach"];

struct Args {
    agent: PathBuf,
    quick: bool,
    out: PathBuf,
    raw: PathBuf,
    only: Option<Vec<String>>,
}

fn parse_args() -> Result<Args, String> {
    let mut agent = None;
    let mut quick = false;
    let mut out = PathBuf::from("bench");
    let mut raw = PathBuf::from("target/bench");
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agent" => agent = args.next().map(PathBuf::from),
            "--quick" => quick = true,
            "--out" => out = args.next().map(PathBuf::from).ok_or("--out DIR")?,
            "--raw" => raw = args.next().map(PathBuf::from).ok_or("--raw DIR")?,
            "--only" => only = Some(args.next().ok_or("--only LIST")?.split(',').map(str::to_owned).collect()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let agent = match agent {
        Some(a) => a,
        // target/release/bench -> target/release/policy-agent
        None => std::env::current_exe().map_err(|e| e.to_string())?.parent().ok_or("no agent")?.join("policy-agent"),
    };
    if !agent.is_file() {
        return Err(format!("agent binary {} not found (--agent PATH)", agent.display()));
    }
    if let Some(unknown) = only.iter().flatten().find(|p: &&String| !PARTS.contains(&p.as_str())) {
        return Err(format!("--only: unknown part {unknown} (parts: {})", PARTS.join(",")));
    }
    Ok(Args { agent, quick, out, raw, only })
}

/// Runs one part; a panic (its namespaces and mounts are removed by their drop guards while
/// unwinding) is recorded and the other parts still run and get reported.
fn guarded<T>(failures: &mut Vec<String>, part: &str, f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(e) => {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned())).unwrap_or_default();
            log(format!("{part} failed: {msg}"));
            failures.push(format!("{part}: {msg}"));
            None
        }
    }
}

fn main() -> ExitCode {
    // The compile child measures what the agent runs: its allocator, set up as it does.
    policy_agent::alloc::commit_on_use();
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("compile-child") {
        let n = |i: usize| argv.get(i).and_then(|s| s.parse().ok()).unwrap_or(1);
        control::compile_child(n(2), n(3), n(4));
        return ExitCode::SUCCESS;
    }
    if argv.get(1).map(String::as_str) == Some("report") {
        return report_from(argv.get(2..4).unwrap_or_default());
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    let wants = |part: &str| args.only.as_ref().is_none_or(|o| o.iter().any(|x| x == part));
    let started = Instant::now();
    let q = args.quick;
    let machine = bench::Machine::probe();
    log(format!("{} ({} cores), kernel {}, {} mode", machine.cpu_model, machine.cores, machine.kernel, if q { "quick" } else { "full" }));
    let mut results = report::Results { quick: q, machine, ..report::Results::default() };

    if wants("datapath") {
        let bpffs = testbed::Bpffs::new("tr");
        let settings = datapath::Settings {
            sizes: vec![10, 100, 1_000, 10_000, 100_000],
            repeat: if q { 100_000 } else { 1_000_000 },
            runs: if q { 5 } else { 11 },
            new_flow_calls: if q { 5_000 } else { 20_000 },
        };
        results.datapath = guarded(&mut results.failures, "datapath", || datapath::run(&settings, &bpffs.path));
    }
    if wants("scale") {
        let bpffs = testbed::Bpffs::new("sc");
        let settings = scale::Settings {
            sizes: if q { vec![10, 100_000] } else { vec![10, 1_000, 100_000, 1_000_000] },
            // Two pools (random, hot) x passes x pool new flows must stay below 58,976 source ports.
            pool: if q { 2_048 } else { 4_096 },
            passes: if q { 3 } else { 5 },
        };
        results.scale = guarded(&mut results.failures, "scale", || scale::run(&settings, &bpffs.path));
    }
    if wants("tiers") {
        // Two classifiers side by side: NetworkPolicy entries only, and with tiers.
        let (a, b) = (testbed::Bpffs::new("ta"), testbed::Bpffs::new("tb"));
        let settings = tiers::Settings { pods: 2_000, policies: 200, calls: if q { 4_000 } else { 20_000 }, rounds: if q { 4 } else { 10 } };
        results.tiers = guarded(&mut results.failures, "tiers", || tiers::run(&settings, [&a.path, &b.path]));
    }
    if wants("flood") || wants("flood6") || wants("crr") {
        let settings = flood::Settings {
            rules: if !wants("flood") { vec![] } else if q { vec![10, 1_000, 10_000] } else { vec![10, 1_000, 10_000, 100_000] },
            rules6: if !wants("flood6") { vec![] } else if q { vec![10] } else { vec![10, 1_000, 10_000] },
            rounds: if q { 2 } else { 3 },
            seconds: if q { 0.3 } else { 1.0 },
            iperf: wants("flood"),
            tcp_rounds: if q { 2 } else { 5 },
            tcp_seconds: if q { 1 } else { 3 },
            budget_secs: if q { 20.0 } else { 60.0 },
            rates: wants("crr").then_some(crr::Settings {
                rules: 1_000,
                rounds: if q { 1 } else { 3 },
                secs: if q { 0.5 } else { 1.0 },
                warmup_secs: if q { 0.1 } else { 0.2 },
                crr_clients: 8,
                rr_connections: 8,
            }),
        };
        results.flood = guarded(&mut results.failures, "flood", || flood::run(&settings, &args.agent));
    }
    if wants("control") {
        let exe = std::env::current_exe().expect("own path");
        let configs = [(1_000, 100), (1_000, 1_000), (10_000, 100), (10_000, 1_000)];
        results.compile = guarded(&mut results.failures, "compile", || control::compile_suite(&exe, &configs, if q { 3 } else { 10 })).unwrap_or_default();
        results.latency = guarded(&mut results.failures, "latency", || {
            control::latency(&args.agent, if q { 5 } else { 30 }, if q { (1_000, 100) } else { (10_000, 1_000) })
        });
        results.rss = guarded(&mut results.failures, "agent memory", || control::rss(&args.agent, 10_000, 1_000, Duration::from_secs(if q { 2 } else { 10 })));
    }
    if wants("attach") {
        results.attach = guarded(&mut results.failures, "attach", || attach::run(&args.agent, if q { 20 } else { 50 }));
    }
    results.run_secs = started.elapsed().as_secs_f64();
    match report::write(&results, &args.out, &args.raw) {
        Ok(files) => {
            for f in files {
                log(format!("wrote {}", f.display()));
            }
            log(format!("done in {:.0} s", results.run_secs));
            if results.failures.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("bench: writing the report: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `report RESULTS_JSON DIR`: REPORT.md, summary.json and the SVGs from the raw results of
/// an earlier run (after a change to the report's wording, say).
fn report_from(args: &[String]) -> ExitCode {
    let [raw, dir] = args else {
        eprintln!("bench: report RESULTS_JSON DIR");
        return ExitCode::from(2);
    };
    let results: Result<report::Results, String> = std::fs::read_to_string(raw)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()));
    match results.and_then(|r| report::write_report(&r, std::path::Path::new(dir)).map_err(|e| e.to_string())) {
        Ok(files) => {
            for f in files {
                log(format!("wrote {}", f.display()));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {raw}: {e}");
            ExitCode::FAILURE
        }
    }
}
