//! `cargo xtask kube-e2e`: Kubernetes' own NetworkPolicy e2e cases (e2e.test v1.20.2, built
//! from the same tree) against the node, in parallel ginkgo processes. Focus
//! `\[sig-network\] NetworkPolicy`, skip `SCTP` (this kernel has no SCTP): 29 cases, the API
//! case included. The junit files go to target/kube-e2e/<label>/, the log next to them.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use super::KUBECONFIG;

pub const FOCUS: &str = r"\[sig-network\] NetworkPolicy";
pub const SKIP: &str = "SCTP";

pub struct E2eOptions {
    /// ginkgo processes.
    pub nodes: u32,
    /// The report directory's name under target/kube-e2e/.
    pub label: String,
    /// Extra `--ginkgo.focus` narrowing (a regexp), for reruns of one case.
    pub focus: Option<String>,
}

/// What the suite reported.
#[derive(Debug, Default)]
pub struct Outcome {
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
    pub failures: Vec<String>,
    pub seconds: u64,
}

pub fn e2e(options: &E2eOptions) -> Result<Outcome> {
    crate::require_root("kube-e2e")?;
    let bin = crate::kube::cache_dir().join("bin");
    anyhow::ensure!(std::path::Path::new(KUBECONFIG).is_file(), "no node: run `cargo xtask kube-node up` first");
    let report = crate::workspace_root().join("target/kube-e2e").join(&options.label);
    let _ = std::fs::remove_dir_all(&report);
    std::fs::create_dir_all(&report)?;
    let focus = options.focus.as_deref().map_or_else(|| FOCUS.to_owned(), |f| format!("{FOCUS}.*{f}"));
    let started = Instant::now();
    let mut child = Command::new(bin.join("ginkgo"))
        .arg(format!("-nodes={}", options.nodes))
        .arg("-noColor")
        .arg("-succinct")
        .arg(bin.join("e2e.test"))
        .arg("--")
        .args(e2e_args(&focus, &report, &bin))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn ginkgo")?;
    let log_path = report.join("ginkgo.log");
    let mut log = std::fs::File::create(&log_path)?;
    let mut summary = None;
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        writeln!(log, "{line}")?;
        println!("{line}");
        if line.contains(" Passed | ") {
            summary = Some(line);
        }
    }
    let status = child.wait()?;
    let mut outcome = parse_summary(summary.as_deref()).with_context(|| format!("no ginkgo summary ({status}); see {}", log_path.display()))?;
    outcome.seconds = started.elapsed().as_secs();
    outcome.failures = failed_cases(&report);
    println!(
        "kube-e2e [{}]: {} passed, {} failed, {} skipped (not selected) in {} s; junit in {}",
        options.label,
        outcome.passed,
        outcome.failed,
        outcome.skipped,
        outcome.seconds,
        report.display()
    );
    for failure in &outcome.failures {
        println!("  FAILED: {failure}");
    }
    Ok(outcome)
}

/// e2e.test's flags for a local single node that is neither GCE nor a cloud: no log dump (it
/// would ssh to nodes), no service-account check before each case, kubectl from the same tree.
fn e2e_args(focus: &str, report: &std::path::Path, bin: &std::path::Path) -> Vec<String> {
    vec![
        format!("--kubectl-path={}", bin.join("kubectl").display()),
        format!("--kubeconfig={KUBECONFIG}"),
        "--provider=local".into(),
        format!("--ginkgo.focus={focus}"),
        format!("--ginkgo.skip={SKIP}"),
        "--ginkgo.noColor".into(),
        format!("--report-dir={}", report.display()),
        "--node-os-distro=debian".into(),
        "--dump-logs-on-failure=false".into(),
        "--disable-log-dump=true".into(),
        "--allowed-not-ready-nodes=0".into(),
        "--e2e-verify-service-account=false".into(),
        "--num-nodes=1".into(),
        "--minStartupPods=0".into(),
    ]
}

/// `SUCCESS! -- 29 Passed | 0 Failed | 0 Pending | 5000 Skipped` (or `FAIL! -- ...`).
fn parse_summary(line: Option<&str>) -> Result<Outcome> {
    let Some(line) = line else { bail!("ginkgo printed no summary") };
    let count = |label: &str| -> u32 {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.windows(2).find(|w| w[1] == label).and_then(|w| w[0].parse().ok()).unwrap_or(0)
    };
    Ok(Outcome { passed: count("Passed"), failed: count("Failed"), skipped: count("Skipped"), ..Outcome::default() })
}

/// The names of the failed test cases in the junit files.
fn failed_cases(report: &std::path::Path) -> Vec<String> {
    let mut failed = Vec::new();
    for file in std::fs::read_dir(report).into_iter().flatten().flatten() {
        let Ok(xml) = std::fs::read_to_string(file.path()) else { continue };
        for case in xml.split("<testcase ").skip(1) {
            let body = case.split("</testcase>").next().unwrap_or_default();
            if body.contains("<failure") {
                let name = case.split("name=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
                failed.push(name.replace("&#39;", "'").replace("&quot;", "\"").replace("&amp;", "&"));
            }
        }
    }
    failed.sort();
    failed.dedup();
    failed
}
