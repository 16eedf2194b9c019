//! What a bench prints and writes: the summary table, the JSON document and the sweep plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::stats::LatencySummary;

/// The server's CPU time and memory over a run (from Admin.GetStatus).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ServerUsage {
    /// CPU seconds (user + system) the server process spent during the run.
    pub cpu_seconds: f64,
    /// CPU time per credential, microseconds.
    pub cpu_us_per_credential: f64,
    /// Cores busy on average (CPU seconds over wall seconds).
    pub cores_busy: f64,
    /// The server process's peak resident set, bytes (in process: the bench's process, client included).
    pub peak_rss_bytes: u64,
    /// In process: the bench client's CPU time per credential (its own threads), microseconds.
    pub client_cpu_us_per_credential: Option<f64>,
}

/// One run at one concurrency.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// Simulated agents (closed loop) or the in-flight cap (open loop).
    pub concurrency: usize,
    /// Open loop: credentials a second offered.
    pub offered_rate: Option<f64>,
    /// Credentials received.
    pub credentials: u64,
    /// Requests answered.
    pub requests: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Credentials a second.
    pub rate: f64,
    /// signet's rate over the token's ceiling.
    pub ratio_to_ceiling: Option<f64>,
    /// signet's rate over an in-process loop of the same per-credential work.
    pub ratio_to_work_loop: Option<f64>,
    /// Request latency.
    pub latency: LatencySummary,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Credentials checked against the bundle.
    pub checked: u64,
    /// Credentials that failed the check (any fails the bench).
    pub bad_credentials: u64,
    /// Why some failed.
    pub bad_examples: Vec<String>,
    /// Requests answered, by the address of the endpoint (replica) that answered.
    pub answered_by: BTreeMap<String, u64>,
    /// Requests that could not reach their endpoint and were sent to the next one.
    pub failovers: u64,
    /// X509-SVIDs whose serial number an earlier one of the run already carried (any fails the bench).
    pub duplicate_serials: u64,
    /// The servers' CPU (summed over replicas) and memory (the largest).
    pub server: Option<ServerUsage>,
}

/// A ceiling measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct CeilingReport {
    /// `token`: bare C_Sign loop; `work-loop`: the same per-credential work in-process, without gRPC or pipeline.
    pub kind: String,
    /// Sessions (token) or threads (work loop).
    pub sessions: usize,
    /// Signatures (or credentials) a second: the mean of `measured`.
    pub rate: f64,
    /// Each measurement. The work loop is measured before the load and again after it, and its ratio uses the mean:
    /// on a shared machine the rate drifts over a bench, and bracketing the load halves what the drift does to
    /// the ratio.
    pub measured: Vec<f64>,
    /// Token ceiling: host CPU per signature, microseconds (a software token's own signing cost).
    pub cpu_us_per_signature: Option<f64>,
}

/// The whole bench.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The RPC.
    pub workload: crate::load::Workload,
    /// What was driven (address or in-process set-up).
    pub target: String,
    /// Closed or open loop.
    pub loop_mode: String,
    /// CSRs per request (X509).
    pub batch: usize,
    /// The token's ceiling.
    pub ceiling: Option<CeilingReport>,
    /// The in-process loop of the same work.
    pub work_loop: Option<CeilingReport>,
    /// One entry per concurrency.
    pub runs: Vec<RunReport>,
    /// The machine's load average at the start and the end (1, 5, 15 minutes).
    pub load_average: (String, String),
    /// Cores of the machine.
    pub cores: usize,
}

impl BenchReport {
    /// Bad credentials over every run.
    pub fn bad_credentials(&self) -> u64 {
        self.runs.iter().map(|r| r.bad_credentials).sum()
    }

    /// The summary table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let unit = self.workload.unit();
        let _ = writeln!(
            s,
            "signet bench: {:?}, {} loop, {}{}",
            self.workload,
            self.loop_mode,
            self.target,
            if self.workload == crate::load::Workload::X509 {
                format!(", {} CSRs a request", self.batch)
            } else {
                String::new()
            }
        );
        if let Some(c) = &self.ceiling {
            let _ = writeln!(
                s,
                "ceiling: bare C_Sign loop, {} sessions: {:.0} signatures/s{}",
                c.sessions,
                c.rate,
                c.cpu_us_per_signature.map_or(String::new(), |u| format!(
                    ", {u:.0} µs host CPU a signature"
                ))
            );
        }
        if let Some(c) = &self.work_loop {
            let each = if c.measured.len() > 1 {
                let each: Vec<String> = c.measured.iter().map(|r| format!("{r:.0}")).collect();
                format!(
                    " (mean of {}, before and after the load)",
                    each.join(" and ")
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                s,
                "in-process loop of the same work, {} threads: {:.0} {unit}/s{each}",
                c.sessions, c.rate
            );
        }
        let _ = writeln!(
            s,
            "{:>6} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>7} {:>7} {:>6}  errors",
            "conc",
            "rate/s",
            "x ceil",
            "x loop",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9",
            "checked",
            "bad",
            "srv µs",
            "cli µs",
            "rss MB"
        );
        let opt = |r: Option<f64>| r.map_or("-".to_string(), |v| format!("{v:.3}"));
        for r in &self.runs {
            let errors = error_summary(&r.errors);
            let (cpu, client, rss) = r.server.map_or(("-".into(), "-".into(), "-".into()), |u| {
                (
                    format!("{:.0}", u.cpu_us_per_credential),
                    u.client_cpu_us_per_credential
                        .map_or("-".into(), |c| format!("{c:.0}")),
                    format!("{:.0}", u.peak_rss_bytes as f64 / (1 << 20) as f64),
                )
            });
            let _ = writeln!(
                s,
                "{:>6} {:>10.0} {:>8} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>9} {:>8} {:>7} {:>7} {:>6}  {errors}",
                r.concurrency,
                r.rate,
                opt(r.ratio_to_ceiling),
                opt(r.ratio_to_work_loop),
                r.latency.p50_ms,
                r.latency.p90_ms,
                r.latency.p99_ms,
                r.latency.p999_ms,
                r.checked,
                r.bad_credentials,
                cpu,
                client,
                rss
            );
            for b in &r.bad_examples {
                let _ = writeln!(s, "       bad credential: {b}");
            }
            if r.answered_by.len() > 1 || r.failovers > 0 {
                let by = r
                    .answered_by
                    .iter()
                    .map(|(a, n)| format!("{a}: {n}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = writeln!(
                    s,
                    "       answered by {by}; {} failed over to another replica",
                    r.failovers
                );
            }
            if r.duplicate_serials > 0 {
                let _ = writeln!(s, "       repeated serial numbers: {}", r.duplicate_serials);
            }
        }
        if self.runs.iter().any(|r| r.server.is_some()) {
            let _ = writeln!(
                s,
                "srv µs / cli µs: CPU per credential of the server and of the bench client (in process: the \
                 client's own threads); rss MB: the server's peak"
            );
        }
        let _ = writeln!(
            s,
            "load average {} -> {} on {} cores",
            self.load_average.0, self.load_average.1, self.cores
        );
        s
    }

    /// Writes the JSON document.
    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        write_json_file(self, path)
    }

    /// Draws throughput and p99 latency against concurrency (log scale), with the ceiling as a line, into an SVG
    /// or a PNG ([`PlotFormat::of`] the file name).
    pub fn write_plot(&self, path: &Path) -> Result<(), String> {
        use plotters::prelude::*;
        let format = PlotFormat::of(path)?;
        if self.runs.is_empty() {
            return Err("nothing to plot".into());
        }
        register_font()?;
        match format {
            PlotFormat::Svg => self.draw(SVGBackend::new(path, PLOT_SIZE).into_drawing_area()),
            PlotFormat::Png => self.draw(BitMapBackend::new(path, PLOT_SIZE).into_drawing_area()),
        }
    }

    fn draw<DB: plotters::prelude::DrawingBackend>(
        &self,
        root: plotters::drawing::DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), String> {
        use plotters::prelude::*;
        let err = |e: &dyn std::fmt::Display| format!("plot: {e}");
        let unit = self.workload.unit();
        let x_max = self
            .runs
            .iter()
            .map(|r| r.concurrency)
            .max()
            .unwrap_or(1)
            .max(2) as f64;
        let ceiling = self.ceiling.as_ref().map(|c| c.rate);
        let y_max = self
            .runs
            .iter()
            .map(|r| r.rate)
            .chain(ceiling)
            .fold(1.0f64, f64::max)
            * 1.15;
        let p99_max = self
            .runs
            .iter()
            .map(|r| r.latency.p99_ms)
            .fold(1.0f64, f64::max)
            * 1.15;
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("signet bench: {unit}/s and p99 latency against concurrency"),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(70)
            .right_y_label_area_size(70)
            .build_cartesian_2d((1f64..x_max).log_scale(), 0f64..y_max)
            .map_err(|e| err(&e))?
            .set_secondary_coord((1f64..x_max).log_scale(), 0f64..p99_max);
        chart
            .configure_mesh()
            .x_desc("concurrent requests (log scale)")
            .y_desc(format!("{unit}/s"))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .configure_secondary_axes()
            .y_desc("p99 latency (ms)")
            .y_label_formatter(&|y| format!("{y:.1}"))
            .draw()
            .map_err(|e| err(&e))?;
        let points: Vec<(f64, f64)> = self
            .runs
            .iter()
            .map(|r| (r.concurrency.max(1) as f64, r.rate))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), BLUE.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("throughput")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))
            .map_err(|e| err(&e))?;
        if let Some(c) = ceiling {
            chart
                .draw_series(LineSeries::new(
                    vec![(1.0, c), (x_max, c)],
                    BLACK.stroke_width(1),
                ))
                .map_err(|e| err(&e))?
                .label(format!("ceiling: bare C_Sign loop ({c:.0}/s)"))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
        }
        let lat: Vec<(f64, f64)> = self
            .runs
            .iter()
            .map(|r| (r.concurrency.max(1) as f64, r.latency.p99_ms))
            .collect();
        chart
            .draw_secondary_series(LineSeries::new(lat.clone(), RED.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label("p99 latency")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .draw_secondary_series(lat.iter().map(|&p| TriangleMarker::new(p, 5, RED.filled())))
            .map_err(|e| err(&e))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
}

/// Draws one line per named series of (concurrency, rate) points, log-scale x, into an SVG or a PNG.
pub fn plot_series(
    path: &Path,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(usize, f64)>)],
) -> Result<(), String> {
    use plotters::prelude::*;
    let format = PlotFormat::of(path)?;
    if series.iter().all(|(_, p)| p.is_empty()) {
        return Err("nothing to plot".into());
    }
    register_font()?;
    fn draw<DB: DrawingBackend>(
        root: plotters::drawing::DrawingArea<DB, plotters::coord::Shift>,
        caption: &str,
        x_desc: &str,
        y_desc: &str,
        series: &[(String, Vec<(usize, f64)>)],
    ) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| format!("plot: {e}");
        let points = series.iter().flat_map(|(_, p)| p.iter());
        let x_max = points.clone().map(|p| p.0).max().unwrap_or(1).max(2) as f64 * 1.2;
        let y_max = points.map(|p| p.1).fold(1.0f64, f64::max) * 1.15;
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(70)
            .build_cartesian_2d((0.8f64..x_max).log_scale(), 0f64..y_max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = pts.iter().map(|&(x, y)| (x.max(1) as f64, y)).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    }
    match format {
        PlotFormat::Svg => draw(
            SVGBackend::new(path, PLOT_SIZE).into_drawing_area(),
            caption,
            x_desc,
            y_desc,
            series,
        ),
        PlotFormat::Png => draw(
            BitMapBackend::new(path, PLOT_SIZE).into_drawing_area(),
            caption,
            x_desc,
            y_desc,
            series,
        ),
    }
}

/// Width and height of the plot (pixels; SVG user units).
const PLOT_SIZE: (u32, u32) = (900, 520);

/// The formats `--plot` draws, by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlotFormat {
    /// `*.svg`.
    Svg,
    /// `*.png`.
    Png,
}

impl PlotFormat {
    /// The format of `path`, or an error that says which names are drawn.
    pub fn of(path: &Path) -> Result<Self, String> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("svg") => Ok(PlotFormat::Svg),
            Some("png") => Ok(PlotFormat::Png),
            _ => Err(format!(
                "--plot {}: name the file *.svg or *.png",
                path.display()
            )),
        }
    }
}

/// Registers the embedded DejaVu Sans as the plot's "sans-serif" (once).
fn register_font() -> Result<(), String> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(
                "sans-serif",
                plotters::style::FontStyle::Normal,
                dejavu::sans::regular(),
            )
            .map_err(|_| "plot: the embedded DejaVu Sans font does not load".to_string())
        })
        .clone()
}

/// A run's error counts in one line: `none`, or `kind: n, kind: n`.
pub fn error_summary(errors: &BTreeMap<String, u64>) -> String {
    if errors.is_empty() {
        return "none".into();
    }
    errors
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes a report as pretty JSON (with a final newline).
pub fn write_json_file<T: Serialize>(report: &T, path: &Path) -> Result<(), String> {
    let text = serde_json::to_string_pretty(report).map_err(|e| format!("JSON: {e}"))?;
    std::fs::write(path, text + "\n").map_err(|e| format!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> BenchReport {
        let run = |concurrency: usize, rate: f64, p99_ms: f64| RunReport {
            concurrency,
            offered_rate: None,
            credentials: 1000,
            requests: 20,
            seconds: 1.0,
            rate,
            ratio_to_ceiling: Some(rate / 10_000.0),
            ratio_to_work_loop: None,
            latency: LatencySummary {
                samples: 20,
                p99_ms,
                ..LatencySummary::default()
            },
            errors: BTreeMap::new(),
            checked: 1000,
            bad_credentials: 0,
            bad_examples: Vec::new(),
            answered_by: BTreeMap::new(),
            failovers: 0,
            duplicate_serials: 0,
            server: None,
        };
        BenchReport {
            workload: crate::load::Workload::X509,
            target: "test".into(),
            loop_mode: "closed".into(),
            batch: 50,
            ceiling: Some(CeilingReport {
                kind: "token".into(),
                sessions: 2,
                rate: 10_000.0,
                measured: vec![10_000.0],
                cpu_us_per_signature: None,
            }),
            work_loop: None,
            runs: vec![
                run(1, 2_000.0, 3.0),
                run(4, 6_000.0, 9.0),
                run(16, 8_000.0, 40.0),
            ],
            load_average: (String::new(), String::new()),
            cores: 2,
        }
    }

    #[test]
    fn plot_format_follows_the_file_name() {
        assert_eq!(PlotFormat::of(Path::new("a/b.svg")), Ok(PlotFormat::Svg));
        assert_eq!(PlotFormat::of(Path::new("b.PNG")), Ok(PlotFormat::Png));
        for bad in ["b.jpg", "b", "svg"] {
            let e = PlotFormat::of(Path::new(bad)).unwrap_err();
            assert!(e.contains("*.svg or *.png"), "{bad}: {e}");
        }
    }

    /// The bitmap has its text drawn with the embedded font: the caption's band holds dark pixels (with no font
    /// the text would be silently left out), and the PNG file is a 900x520 PNG.
    #[test]
    fn png_plot_draws_its_text_with_the_embedded_font() {
        use plotters::prelude::*;
        register_font().unwrap();
        let (w, h) = PLOT_SIZE;
        let mut buf = vec![0u8; (w * h * 3) as usize];
        report()
            .draw(BitMapBackend::with_buffer(&mut buf, PLOT_SIZE).into_drawing_area())
            .unwrap();
        // The caption is centred in the top 30 rows, above the chart's frame.
        let dark_in_caption = buf
            .chunks(3)
            .take((w * 30) as usize)
            .filter(|px| px.iter().all(|&c| c < 100))
            .count();
        assert!(
            dark_in_caption > 200,
            "{dark_in_caption} dark pixels in the caption"
        );

        let dir = std::env::temp_dir().join(format!("signet-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("sweep.png");
        report().write_plot(&png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, big-endian, right after the chunk's length and type.
        assert_eq!(&bytes[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), w);
        assert_eq!(u32::from_be_bytes(bytes[20..24].try_into().unwrap()), h);
    }

    #[test]
    fn svg_plot_carries_its_labels() {
        let dir = std::env::temp_dir().join(format!("signet-svg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("sweep.svg");
        report().write_plot(&svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(text.starts_with("<svg"));
        for label in [
            "p99 latency",
            "ceiling: bare C_Sign loop (10000/s)",
            "throughput",
        ] {
            assert!(text.contains(label), "{label} missing");
        }
    }
}
