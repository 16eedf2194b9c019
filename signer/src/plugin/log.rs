//! Logging as go-plugin expects from a plug-in: one hclog JSON object per stderr line
//! (`{"@level":"info","@message":"...","@timestamp":"...", ...fields}`). SPIRE reads the plug-in's stderr and writes
//! each line into its own log at that level, with the fields attached.

use std::io::Write as _;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// A tracing layer that writes hclog JSON lines to stderr.
#[derive(Debug, Default)]
pub struct HclogLayer;

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_string(),
            Value::String(format!("{value:?}")),
        );
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_string(), Value::String(value.to_string()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_string(), Value::from(value));
    }
}

fn level_name(l: &Level) -> &'static str {
    match *l {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// The hclog JSON line of an event (without the newline).
pub fn hclog_line(level: &Level, target: &str, mut fields: Map<String, Value>) -> String {
    let message = fields
        .remove("message")
        .unwrap_or(Value::String(String::new()));
    let mut out = Map::new();
    out.insert("@level".into(), Value::String(level_name(level).into()));
    out.insert("@message".into(), message);
    // go-plugin parses exactly this layout (Go's "2006-01-02T15:04:05.000000Z07:00"); a line it cannot parse
    // would reach SPIRE's log as raw text.
    let now = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        ))
        .unwrap_or_default();
    out.insert("@timestamp".into(), Value::String(now));
    out.insert("@module".into(), Value::String(target.replace("::", ".")));
    for (k, v) in fields {
        // hclog reserves the @-prefixed keys.
        out.insert(k.trim_start_matches('@').to_string(), v);
    }
    Value::Object(out).to_string()
}

impl<S: Subscriber> Layer<S> for HclogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let meta = event.metadata();
        let mut line = hclog_line(meta.level(), meta.target(), fields.0);
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_hclog_json() {
        let mut f = Map::new();
        f.insert("message".into(), Value::String("hello".into()));
        f.insert("endpoint".into(), Value::String("127.0.0.1:1".into()));
        let line = hclog_line(&Level::WARN, "signet::plugin", f);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["@level"], "warn");
        assert_eq!(v["@message"], "hello");
        assert_eq!(v["endpoint"], "127.0.0.1:1");
        let ts = v["@timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), "2006-01-02T15:04:05.000000Z".len(), "{ts}");
    }
}
