//! A lint failure increments `signet_lint_failures_total{rule=...}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use signet::keys::KeyType;
use signet::lint::LINT_FAILURES_METRIC;
use signet::x509::{Authority, RootRequest};

use crate::common::*;

#[derive(Default)]
struct Counts(Mutex<HashMap<String, u64>>);

struct Handle(Arc<Counts>, String);

impl CounterFn for Handle {
    fn increment(&self, value: u64) {
        *self.0.0.lock().unwrap().entry(self.1.clone()).or_default() += value;
    }
    fn absolute(&self, value: u64) {
        self.0.0.lock().unwrap().insert(self.1.clone(), value);
    }
}

struct CountingRecorder(Arc<Counts>);

impl Recorder for CountingRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        Counter::from_arc(Arc::new(Handle(
            self.0.clone(),
            format!("{}{{{}}}", key.name(), labels.join(",")),
        )))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[test]
fn lint_failure_increments_the_counter_with_its_rule() {
    let counts = Arc::new(Counts::default());
    let recorder = CountingRecorder(counts.clone());
    let req = RootRequest {
        trust_domain: td(),
        subject: root_subject("r"),
        ttl: Duration::from_secs(60),
        path_len: Some(0),
    };
    let key = SoftwareKeys.make(KeyType::EcP256).unwrap();
    for _ in 0..2 {
        let err = metrics::with_local_recorder(&recorder, || {
            Authority::self_signed_root(key.clone(), &req, now()).unwrap_err()
        });
        assert_eq!(err.rule(), "x509.path-len");
    }
    let name = format!("{LINT_FAILURES_METRIC}{{rule=x509.path-len}}");
    assert_eq!(
        counts.0.lock().unwrap().get(&name),
        Some(&2),
        "{:?}",
        counts.0.lock().unwrap()
    );
}
