//! Developer and CI tasks: `cargo xtask <setup|build-and-load|test|demo|bench|kube|kube-node|kube-e2e>`.

mod kube;
mod kube_node;
mod node_checks;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: rust-src for nightly, bpf-linker, Debian packages.
    Setup,
    /// Build the classifier and agent, load and attach it to an interface, pin its maps.
    BuildAndLoad {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value_t = HookChoice::Both)]
        direction: HookChoice,
        /// bpffs directory for maps and links.
        #[arg(long, default_value = "/sys/fs/bpf/policy")]
        pin_dir: PathBuf,
        /// Remove the classifier from the interface instead.
        #[arg(long)]
        detach: bool,
    },
    /// Build everything and run the three-tier demo in network namespaces.
    Demo,
    /// Build (first run, about 15 minutes) or reuse the Kubernetes v1.20.2 binaries (control
    /// plane, node, e2e suite); prints their directory (the kube suite reads it from POLICY_KUBE_BIN).
    Kube,
    /// A real single-node Kubernetes v1.20.2 cluster on this machine, offline (root): `up`
    /// (cleans up first, waits for a Ready node and a running pod), `down` (undoes everything
    /// `up` did, also after a killed `up`), `status`, `deploy` (the agent's image and
    /// `kubectl apply -f manifests/install/`), `suite` (`cargo xtask test`'s real-node step: up,
    /// deploy, the upstream NetworkPolicy suite, down).
    KubeNode {
        #[arg(value_enum)]
        action: KubeNodeAction,
    },
    /// Kubernetes' own NetworkPolicy e2e suite (v1.20.2, 29 cases) against the node of
    /// `kube-node up` (root); junit under target/kube-e2e/LABEL/.
    KubeE2e {
        /// Parallel ginkgo processes.
        #[arg(long, default_value_t = 4)]
        nodes: u32,
        /// Name of the report directory.
        #[arg(long, default_value = "latest")]
        label: String,
        /// Only the cases matching this regexp too.
        #[arg(long)]
        focus: Option<String>,
    },
    /// Measure the datapath and the control plane next to iptables, ipset and nftables; write
    /// bench/REPORT.md, bench/summary.json (medians), SVG plots and the raw samples in
    /// target/bench/results.json (root).
    Bench {
        /// Fewer, shorter runs (about two minutes).
        #[arg(long)]
        quick: bool,
        /// Only these parts (comma-separated: datapath, scale, tiers, flood, flood6, crr, control, attach); the partial
        /// report goes to target/bench/only/, never over bench/REPORT.md.
        #[arg(long, value_name = "PARTS")]
        only: Option<String>,
    },
    /// Differential fuzzing of the classifier against its reference model (root): a million
    /// frames through BPF_PROG_TEST_RUN by default; the suite runs 20,000.
    Fuzz {
        /// Frames to generate.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// PRNG seed (the default is the suite's).
        #[arg(long)]
        seed: Option<String>,
    },
    /// Run every test suite: unit tests, the proptest oracle, the privileged suites, the demo.
    Test {
        /// Only run tests whose name contains this (passed to the test binaries).
        filter: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KubeNodeAction {
    Up,
    Down,
    Status,
    Deploy,
    /// With the agent deployed: first-packet enforcement and a SIGKILLed agent's restart.
    Check,
    /// Up, deploy, the upstream suite, the checks, and always down (the step of `test`).
    Suite,
}

#[derive(Clone, Copy, ValueEnum)]
enum HookChoice {
    Ingress,
    Egress,
    Both,
}

impl HookChoice {
    fn as_str(self) -> &'static str {
        match self {
            HookChoice::Ingress => "ingress",
            HookChoice::Egress => "egress",
            HookChoice::Both => "both",
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::run(),
        Task::BuildAndLoad { iface, direction, pin_dir, detach } => {
            setup::run()?;
            let agent = build_agent()?;
            let verb = if detach { "detach" } else { "attach" };
            run(Command::new(agent)
                .args([verb, "--iface", &iface, "--direction", direction.as_str(), "--bpffs"])
                .arg(&pin_dir))
        }
        Task::Demo => demo(false),
        Task::Kube => {
            println!("{}", kube::ensure()?.display());
            Ok(())
        }
        Task::KubeNode { action } => match action {
            KubeNodeAction::Up => kube_node::up(),
            KubeNodeAction::Down => kube_node::down(),
            KubeNodeAction::Status => kube_node::status(),
            KubeNodeAction::Deploy => kube_node::deploy(),
            KubeNodeAction::Check => kube_node::checks(),
            KubeNodeAction::Suite => kube_node::real_node_suite(),
        },
        Task::KubeE2e { nodes, label, focus } => kube_node::e2e(&kube_node::E2eOptions { nodes, label, focus }).map(drop),
        Task::Test { filter } => test(filter.as_deref()),
        Task::Bench { quick, only } => bench(quick, only.as_deref()),
        Task::Fuzz { frames, seed } => fuzz(frames, seed.as_deref()),
    }
}

/// The workspace crate with the simulated node, the demo and the benchmarks (xtask/testbed).
const TESTBED: &str = "policy-testbed";

/// Debian packages the benchmark baselines use, with a command each provides.
const BENCH_PACKAGES: &[(&str, &str)] =
    &[("iptables", "iptables-legacy-restore"), ("ipset", "ipset"), ("nftables", "nft"), ("iperf3", "iperf3")];

/// Builds the agent and the test bed's bench in release, runs it and lets it write bench/
/// (the report) and target/bench/ (the raw samples).
fn bench(quick: bool, only: Option<&str>) -> Result<()> {
    setup::run()?;
    require_root("the benchmarks")?;
    setup::ensure_debian_packages(BENCH_PACKAGES)?;
    run(cargo().args(["build", "--release", "--package", "policy-agent", "--bins", "--package", TESTBED, "--bin", "bench"]))?;
    let root = workspace_root();
    let mut cmd = Command::new(root.join("target/release/bench"));
    let (out, raw) = match only {
        Some(parts) => {
            cmd.arg("--only").arg(parts);
            (root.join("target/bench/only"), root.join("target/bench/only"))
        }
        None => (root.join("bench"), root.join("target/bench")),
    };
    cmd.arg("--agent").arg(root.join("target/release/policy-agent")).arg("--out").arg(out).arg("--raw").arg(raw);
    if quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs a command from the workspace root and fails with its command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.current_dir(workspace_root()).status().with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the agent (and through its build.rs the classifier); returns the binary.
fn build_agent() -> Result<PathBuf> {
    run(cargo().args(["build", "--package", "policy-agent", "--bins"]))?;
    Ok(workspace_root().join("target/debug/policy-agent"))
}

/// Runs the demo; with `check`, a reachability table that differs from the policies fails.
fn demo(check: bool) -> Result<()> {
    setup::run()?;
    require_root("the demo")?;
    run(cargo().args(["build", "--package", "policy-agent", "--bins", "--package", TESTBED, "--bin", "demo"]))?;
    let root = workspace_root();
    let mut cmd = Command::new(root.join("target/debug/demo"));
    cmd.arg("--agent").arg(root.join("target/debug/policy-agent"));
    if check {
        cmd.arg("--check");
    }
    run(&mut cmd)
}

fn require_root(what: &str) -> Result<()> {
    if !nix_is_root() {
        bail!("{what} needs root (network namespaces, BPF)");
    }
    Ok(())
}

fn test(filter: Option<&str>) -> Result<()> {
    setup::run()?;
    require_root("the privileged test suites")?;
    // The simulated nodes' kube-proxy (iptables NAT) and its conntrack table, read by the
    // Service cases.
    setup::ensure_debian_packages(TEST_PACKAGES)?;
    let filter: Vec<&str> = filter.into_iter().collect();
    // Unit tests, layout tests and the proptest oracle: no privileges needed.
    run(cargo().args(["test", "--"]).args(&filter))?;
    // The kube suite runs a real kube-apiserver: built on the first run, then reused.
    let kube_bin = kube::ensure()?;
    // Privileged suites share kernel state (bpffs, namespaces): one test thread each.
    for suite in PRIVILEGED_SUITES {
        run(cargo()
            .args(["test", "--package", "policy-agent", "--test", suite, "--", "--ignored", "--test-threads=1"])
            .args(&filter)
            .env(kube::BIN_ENV, &kube_bin))?;
    }
    if filter.is_empty() {
        // The README's first command, checked.
        demo(true)?;
    }
    // ---- The real node (issue 10): kube-node up, deploy, Kubernetes' NetworkPolicy suite, down.
    if filter.is_empty() && std::env::var_os(kube_node::SKIP_ENV).is_none_or(|v| v != "1") {
        kube_node::real_node_suite()?;
    }
    Ok(())
}

/// Debian packages the privileged suites use, with a command each provides.
const TEST_PACKAGES: &[(&str, &str)] = &[("iptables", "iptables-legacy-restore"), ("conntrack", "conntrack")];

/// Integration test files of policy-agent whose tests are `#[ignore]`d in a plain `cargo test`
/// because they need root.
const PRIVILEGED_SUITES: &[&str] = &["datapath", "fuzz", "agent", "conformance", "kube"];

/// The fuzz suite with more frames; new divergences are saved to its regression corpus.
fn fuzz(frames: u64, seed: Option<&str>) -> Result<()> {
    setup::run()?;
    require_root("the fuzzer")?;
    let mut cmd = cargo();
    cmd.args(["test", "--release", "--package", "policy-agent", "--test", "fuzz", "--", "--ignored", "--test-threads=1", "--nocapture"])
        .env("FUZZ_FRAMES", frames.to_string());
    if let Some(seed) = seed {
        cmd.env("FUZZ_SEED", seed);
    }
    run(&mut cmd)
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}
