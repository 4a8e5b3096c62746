/work/main/target/debug/deps/policy_common-f2220411af49d7ba.d: policy-common/src/lib.rs policy-common/src/conntrack.rs policy-common/src/counters.rs policy-common/src/endpoint.rs policy-common/src/event.rs policy-common/src/identity.rs policy-common/src/ipcache.rs policy-common/src/policy.rs

/work/main/target/debug/deps/libpolicy_common-f2220411af49d7ba.rlib: policy-common/src/lib.rs policy-common/src/conntrack.rs policy-common/src/counters.rs policy-common/src/endpoint.rs policy-common/src/event.rs policy-common/src/identity.rs policy-common/src/ipcache.rs policy-common/src/policy.rs

/work/main/target/debug/deps/libpolicy_common-f2220411af49d7ba.rmeta: policy-common/src/lib.rs policy-common/src/conntrack.rs policy-common/src/counters.rs policy-common/src/endpoint.rs policy-common/src/event.rs policy-common/src/identity.rs policy-common/src/ipcache.rs policy-common/src/policy.rs

policy-common/src/lib.rs:
policy-common/src/conntrack.rs:
policy-common/src/counters.rs:
policy-common/src/endpoint.rs:
policy-common/src/event.rs:
policy-common/src/identity.rs:
policy-common/src/ipcache.rs:
policy-common/src/policy.rs:
