//! `cargo xtask kube-e2e`: Kubernetes' own NetworkPolicy e2e cases (e2e.test v1.20.2, built
//! from the same tree) against the node, in parallel ginkgo processes. Focus
//! `\[sig-network\] NetworkPolicy`, skip `SCTP` (this kernel has no SCTP): 29 cases, the API
//! case included. The junit files go to target/kube-e2e/<label>/, the log next to them.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, ensure};

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
    for line in BufReader::new(child.stdout.take().expect("piped stdout")).lines() {
        let line = line?;
        writeln!(log, "{line}")?;
        println!("{line}");
    }
    let status = child.wait()?;
    // The junit files, not the console: with -succinct and parallel nodes, ginkgo prints the
    // counts only when something failed.
    let mut outcome = junit_outcome(&report);
    ensure!(outcome.passed + outcome.failed > 0, "no case ran ({status}); see {}", log_path.display());
    outcome.seconds = started.elapsed().as_secs();
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

/// Counts and the names of the failed cases, from every junit file (one per ginkgo node):
/// a case is skipped (not selected), failed, or passed.
fn junit_outcome(report: &std::path::Path) -> Outcome {
    let mut outcome = Outcome::default();
    for file in std::fs::read_dir(report).into_iter().flatten().flatten() {
        let Ok(xml) = std::fs::read_to_string(file.path()) else { continue };
        for case in xml.split("<testcase ").skip(1) {
            let body = case.split("</testcase>").next().unwrap_or_default();
            if body.contains("<skipped") {
                outcome.skipped += 1;
            } else if body.contains("<failure") {
                outcome.failed += 1;
                let name = case.split("name=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
                outcome.failures.push(name.replace("&#39;", "'").replace("&quot;", "\"").replace("&amp;", "&"));
            } else {
                outcome.passed += 1;
            }
        }
    }
    outcome.failures.sort();
    outcome.failures.dedup();
    outcome
}

#[cfg(test)]
mod tests {
    #[test]
    fn junit_counts_passed_failed_and_skipped_cases() {
        let dir = std::env::temp_dir().join(format!("junit-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let xml = r#"<testsuite><testcase name="a passes" time="1"></testcase><testcase name="b &#39;fails&#39;"><failure>x</failure></testcase><testcase name="c"><skipped></skipped></testcase></testsuite>"#;
        std::fs::write(dir.join("junit_01.xml"), xml).expect("write");
        std::fs::write(dir.join("junit_02.xml"), r#"<testsuite><testcase name="d"></testcase></testsuite>"#).expect("write");
        let outcome = super::junit_outcome(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!((outcome.passed, outcome.failed, outcome.skipped), (2, 1, 1));
        assert_eq!(outcome.failures, ["b 'fails'"]);
    }
}
