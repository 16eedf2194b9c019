//! The monitoring files in `deploy/` name only metrics the appliance exports: an appliance with its operations
//! listener on (SoftHSM2) issues X509- and JWT-SVIDs and refuses a connection without a credential, then every
//! `signet_*` name in every query of the Grafana dashboard (`deploy/grafana/signet.json`) and in every expression of
//! the alert rules (`deploy/prometheus/alerts.yml`) must be in its `/metrics`.
//!
//! Its own test binary, so that the process-wide metrics recorder is this appliance's.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test fixtures and helpers outside #[test] fns: a failed fixture is a failed test"
)]

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;

use signet_proto::signet::v1 as pb;
use signet_proto::signet::v1::issuer_client::IssuerClient;
use support::bed::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The `signet_*` metric names in `text` (PromQL), histogram series suffixes stripped.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("signet_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let mut name = &tail[..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(n) = name.strip_suffix(suffix) {
                name = n;
            }
        }
        // A name preceded by a letter or underscore is part of another word (not a metric).
        let standalone = i == 0
            || !rest[..i]
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if standalone {
            out.insert(name.to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// Every `expr` of the dashboard's panels (and of its templating queries).
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    ("query", serde_json::Value::String(s)) if s.contains("signet_") => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

/// The `expr` values of the alert rules (block scalars included: the lines indented below `expr: |`).
fn alert_expressions(yaml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let Some(v) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let v = v.trim();
        if v != "|" && v != ">" && v != "|-" && v != ">-" {
            out.push(v.to_string());
            continue;
        }
        let indent = line.len() - trimmed.len();
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            let t = next.trim_start();
            if !t.is_empty() && next.len() - t.len() <= indent {
                break;
            }
            block.push_str(next);
            block.push('\n');
            lines.next();
        }
        out.push(block);
    }
    out
}

/// The metric names of a Prometheus text exposition.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
                .to_string()
        })
        .collect()
}

async fn get_metrics(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_string(&mut body),
    )
    .await
    .expect("/metrics answers within 10 s")
    .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

#[test]
fn promql_names_are_scanned() {
    let q = r#"histogram_quantile(0.9, sum by (le) (rate(signet_api_request_seconds_bucket{x="signet_no"}[5m]))) / signet_a_total"#;
    let names = names_in(q);
    assert!(names.contains("signet_api_request_seconds"), "{names:?}");
    assert!(names.contains("signet_a_total"), "{names:?}");
    let alerts = alert_expressions(
        "    expr: |\n      a_b\n      + signet_x\n    for: 1m\n  expr: signet_y > 1\n",
    );
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert!(names_in(&alerts.join(" ")).contains("signet_x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_name_exported_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/signet.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() >= 10, "dashboard queries: {queries:?}");
    let alerts = alert_expressions(
        &std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap(),
    );
    assert!(alerts.len() >= 10, "alert expressions: {alerts:?}");

    let Some(bed) = Bed::start_with(|c| c.server.metrics = Some("127.0.0.1:0".into())).await else {
        return;
    };
    let ops = bed
        .app
        .metrics_addr()
        .expect("the operations listener is on");
    // Traffic, so that the series of requests exist: X509- and JWT-SVIDs, a refusal before authentication.
    let agent = bed.credential_for(AGENT).await;
    let mut c = IssuerClient::new(bed.channel(Some(&agent)).await);
    for i in 0..3 {
        let (csr, _) = csr_for(&format!("spiffe://example.org/workloads/w{i}"));
        expect_svid(mint_one(&mut c, csr, 60).await);
    }
    c.mint_jwtsvid(pb::MintJwtsvidRequest {
        spiffe_id: "spiffe://example.org/workloads/j".into(),
        audience: vec!["db".into()],
        ttl_seconds: 300,
    })
    .await
    .unwrap();
    let refused = bed.refused_at_handshake(None).await;
    assert!(!refused.is_empty());
    drop(c);

    // The RPCs' times are recorded when their handlers let go of the call: wait for them (bounded).
    let text = support::wait::wait_for_async(
        "the RPCs' times and the refusal in /metrics",
        std::time::Duration::from_secs(30),
        || async {
            let text = get_metrics(ops).await;
            if text.contains("signet_api_request_seconds_bucket")
                && text.contains("signet_unauthenticated_refusals_total")
            {
                Ok(text)
            } else {
                Err(text)
            }
        },
    )
    .await;
    let have = exported(&text);
    for (what, exprs) in [("dashboard", &queries), ("alerts.yml", &alerts)] {
        for q in exprs.iter() {
            for name in names_in(q) {
                assert!(
                    have.contains(&name),
                    "{what} queries {name}, which /metrics does not export (query: {q}); exported: {have:?}"
                );
            }
        }
    }
    // The latency histogram has buckets (not a summary) and carries the outcome.
    assert!(
        text.lines()
            .any(|l| l.starts_with("signet_api_request_seconds_bucket")
                && l.contains("outcome=\"issued\"")),
        "{text}"
    );
    bed.stop().await;
}
