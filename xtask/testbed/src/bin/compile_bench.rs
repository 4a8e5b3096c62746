//! Times the policy compiler on a synthetic cluster (run in release mode):
//! `cargo run --release -p policy-testbed --bin compile_bench [PODS] [POLICIES]`.

use std::time::{Duration, Instant};

use testbed::synthetic::{synthetic_cluster, synthetic_node};
use policy_agent::compile::{MapContents, compile, diff, render, sequential_slots};

fn main() {
    policy_agent::alloc::commit_on_use();
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let pods = args.next().and_then(Result::ok).unwrap_or(10_000);
    let policies = args.next().and_then(Result::ok).unwrap_or(1_000);
    let state = synthetic_cluster(pods, policies);
    let node = synthetic_node();

    let mut compile_times = Vec::new();
    let mut compiled = compile(&state, &node);
    for _ in 0..10 {
        let start = Instant::now();
        compiled = compile(&state, &node);
        compile_times.push(start.elapsed());
    }
    let slots = sequential_slots(&compiled);
    let start = Instant::now();
    let contents = render(&compiled, &slots, false);
    let render_time = start.elapsed();
    let start = Instant::now();
    let updates = diff(&MapContents::default(), &contents);
    let diff_time = start.elapsed();

    compile_times.sort();
    let median = compile_times[compile_times.len() / 2];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("{pods} pods, {policies} policies, node {}", node.name);
    println!(
        "compile: median {:.1} ms, min {:.1} ms, max {:.1} ms (10 runs)",
        ms(median),
        ms(compile_times[0]),
        ms(compile_times[compile_times.len() - 1])
    );
    println!("render {:.1} ms, diff from empty {:.1} ms ({} writes)", ms(render_time), ms(diff_time), updates.len());
    println!(
        "identities {}, ipcache {}, endpoints {}, policy entries {}, cookies {}, problems {}",
        compiled.identities.len(),
        contents.ipcache.len(),
        contents.endpoints.len(),
        contents.policy.len(),
        compiled.cookies.len(),
        compiled.problems.len()
    );
    println!("one change, compiled incrementally (median of 7):");
    for change in testbed::bench::control::change_compiles(&state, &node) {
        println!("  {:40} {:7.1} ms   redone: {}", change.kind, change.ms, change.redone);
    }
}
