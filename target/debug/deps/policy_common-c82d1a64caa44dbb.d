/work/main/target/debug/deps/policy_common-c82d1a64caa44dbb.d: policy-common/src/lib.rs policy-common/src/conntrack.rs policy-common/src/counters.rs policy-common/src/endpoint.rs policy-common/src/event.rs policy-common/src/identity.rs policy-common/src/ipcache.rs policy-common/src/policy.rs

/work/main/target/debug/deps/policy_common-c82d1a64caa44dbb: policy-common/src/lib.rs policy-common/src/conntrack.rs policy-common/src/counters.rs policy-common/src/endpoint.rs policy-common/src/event.rs policy-common/src/identity.rs policy-common/src/ipcache.rs policy-common/src/policy.rs

policy-common/src/lib.rs:
policy-common/src/conntrack.rs:
policy-common/src/counters.rs:
policy-common/src/endpoint.rs:
policy-common/src/event.rs:
policy-common/src/identity.rs:
policy-common/src/ipcache.rs:
policy-common/src/policy.rs:
