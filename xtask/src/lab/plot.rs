//! The lab's PNG plots (plotters, bitmap backend; text through ab_glyph with Debian's DejaVu
//! Sans, read at run time).
use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

use super::{Config, Load, PAGE, Policy, Run, SETTLE_S, report};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        let Ok(bytes) = std::fs::read(FONT) else {
            return false;
        };
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    });
    anyhow::ensure!(
        ok,
        "no usable font at {FONT} (Debian package fonts-dejavu-core)"
    );
    Ok(())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e:?}")
}

/// Colour of a policy, the same in every plot.
fn colour(p: &str) -> RGBColor {
    if p.starts_with("immp") && p.contains("floor") {
        RGBColor(0, 110, 60)
    } else if p.starts_with("immp") {
        RGBColor(40, 170, 80)
    } else if p.starts_with("cpulimit") {
        RGBColor(230, 130, 0)
    } else if p.starts_with("cgroup") {
        RGBColor(70, 120, 200)
    } else if p.contains("auto-converge") {
        RGBColor(150, 60, 170)
    } else {
        RGBColor(120, 120, 120)
    }
}

fn load_name(l: Load) -> &'static str {
    match l {
        Load::Idle => "idle",
        Load::Light => "light",
        Load::Heavy => "heavy",
    }
}

/// Every plot into `out`.
pub fn all(out: &Path, configs: &[Config], runs: &[Run]) -> anyhow::Result<()> {
    register_font()?;
    let sums: Vec<report::Summary> = report::summarise(configs, runs)
        .into_iter()
        .filter(|s| s.runs > 0)
        .collect();
    times(&out.join("migration-time.png"), &sums, runs).context("migration-time.png")?;
    writer_service(&out.join("writer-service.png"), &sums, runs).context("writer-service.png")?;
    frontier(&out.join("frontier.png"), &sums).context("frontier.png")?;
    for load in [Load::Idle, Load::Light, Load::Heavy] {
        let name = format!("timeline-{}.png", load_name(load));
        timelines(&out.join(&name), load, configs, runs).context(name)?;
    }
    Ok(())
}

/// Horizontal bars: a median per configuration, its runs as dots, names written beside.
fn bars(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    rows: &[(String, String, Vec<f64>, Option<String>)],
    limit: Option<f64>,
) -> anyhow::Result<()> {
    let finite = |v: &Vec<f64>| {
        v.iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect::<Vec<_>>()
    };
    let any_inf = rows.iter().any(|r| r.2.iter().any(|x| x.is_infinite()));
    let top = rows
        .iter()
        .flat_map(|r| finite(&r.2))
        .fold(if any_inf { limit.unwrap_or(0.0) } else { 0.0 }, f64::max)
        .max(1e-9);
    let n = rows.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(10)
        .build_cartesian_2d(0.0..top * 1.6, -0.6..n - 0.4)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc(unit)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    for (i, (name, policy, vals, note)) in rows.iter().enumerate() {
        let y = n - 1.0 - i as f64;
        let c = colour(policy);
        let med = {
            let mut v: Vec<f64> = vals.clone();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let bar = if med.is_finite() {
            med
        } else {
            limit.unwrap_or(top)
        };
        let style = if med.is_finite() {
            c.mix(0.75).filled()
        } else {
            c.mix(0.25).filled()
        };
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, y - 0.35), (bar, y + 0.35)],
                style,
            )))
            .map_err(err)?;
        let dots: Vec<f64> = vals
            .iter()
            .map(|v| {
                if v.is_finite() {
                    *v
                } else {
                    limit.unwrap_or(top)
                }
            })
            .collect();
        chart
            .draw_series(dots.iter().map(|v| Circle::new((*v, y), 3, BLACK.filled())))
            .map_err(err)?;
        if dots.len() > 1 {
            let (lo, hi) = dots
                .iter()
                .fold((f64::MAX, f64::MIN), |a, v| (a.0.min(*v), a.1.max(*v)));
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(lo, y), (hi, y)],
                    BLACK.stroke_width(1),
                )))
                .map_err(err)?;
        }
        let x = dots.iter().copied().fold(bar, f64::max);
        let value = if med.is_finite() {
            format!("{med:.1}")
        } else {
            "not converged".into()
        };
        let label = format!(
            "{name}: {value}{}",
            note.as_ref().map_or(String::new(), |n| format!(" {n}"))
        );
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (x + top * 0.02, y + 0.2),
                ("sans-serif", 13).into_font(),
            )))
            .map_err(err)?;
    }
    Ok(())
}

fn row_name(s: &report::Summary) -> String {
    format!("{} / {}", load_name(s.load), s.policy)
}

fn times(path: &Path, sums: &[report::Summary], runs: &[Run]) -> anyhow::Result<()> {
    let rows: Vec<(String, String, Vec<f64>, Option<String>)> = sums
        .iter()
        .map(|s| {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.key == s.key)
                .map(report::time_of)
                .collect();
            let note =
                (s.converged < s.runs).then(|| format!("({}/{} converged)", s.converged, s.runs));
            (row_name(s), s.policy.clone(), v, note)
        })
        .collect();
    let limit = sums.iter().map(|s| s.limit_s).fold(0.0, f64::max);
    let h = 80 + 26 * rows.len() as u32;
    let root = BitMapBackend::new(path, (1100, h)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    bars(
        &root,
        "Migration time per policy (median bar, runs as dots; pale: not converged at the limit)",
        "seconds",
        &rows,
        Some(limit),
    )?;
    root.present().map_err(err)?;
    Ok(())
}

fn writer_service(path: &Path, sums: &[report::Summary], runs: &[Run]) -> anyhow::Result<()> {
    let of = |s: &report::Summary, f: &dyn Fn(&Run) -> Option<f64>| -> Vec<f64> {
        runs.iter()
            .filter(|r| r.key == s.key)
            .filter_map(f)
            .collect()
    };
    let writer_rows: Vec<_> = sums
        .iter()
        .filter(|s| s.load != Load::Idle)
        .map(|s| {
            let note = s
                .writer_vs_uncapped
                .map(|r| format!("MB/s ({r:.2} x uncapped)"));
            (
                row_name(s),
                s.policy.clone(),
                of(s, &|r| r.writer_pages_per_s.map(|p| p * PAGE / 1e6)),
                note,
            )
        })
        .collect();
    let p99_rows: Vec<_> = sums
        .iter()
        .map(|s| {
            (
                row_name(s),
                s.policy.clone(),
                of(s, &|r| r.service_p99_ms),
                Some("ms".to_string()),
            )
        })
        .collect();
    let h = 80 + 26 * p99_rows.len().max(writer_rows.len()) as u32;
    let root = BitMapBackend::new(path, (1600, h)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (l, r) = root.split_horizontally(800);
    bars(
        &l,
        "Writer throughput during the migration",
        "MB/s (pages written x 4 KiB, host time)",
        &writer_rows,
        None,
    )?;
    bars(
        &r,
        "Service p99 latency during the migration",
        "ms (from each request's scheduled time)",
        &p99_rows,
        None,
    )?;
    root.present().map_err(err)?;
    Ok(())
}

/// Migration time against writer throughput: the fixed caps draw the frontier.
fn frontier(path: &Path, sums: &[report::Summary]) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (l, r) = root.split_horizontally(700);
    for (area, load) in [(l, Load::Light), (r, Load::Heavy)] {
        let pts: Vec<&report::Summary> = sums
            .iter()
            .filter(|s| s.load == load && s.writer_median_mb_s.is_some())
            .collect();
        let limit = pts.iter().map(|s| s.limit_s).fold(0.0, f64::max);
        let y = |s: &report::Summary| {
            s.time_median_s
                .map(|t| if t.is_finite() { t } else { limit })
                .unwrap_or(limit)
        };
        let xmax = pts
            .iter()
            .filter_map(|s| s.writer_median_mb_s)
            .fold(0.1, f64::max);
        let ymax = pts.iter().map(|s| y(s)).fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!(
                    "{} writer: migration time vs writer throughput",
                    load_name(load)
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..xmax * 1.35, 0.0..ymax * 1.15)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("writer MB/s during the migration")
            .y_desc("migration s (at the limit: not converged)")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        let mut caps: Vec<(f64, f64)> = pts
            .iter()
            .filter(|s| s.policy.starts_with("cgroup"))
            .map(|s| (s.writer_median_mb_s.unwrap_or(0.0), y(s)))
            .collect();
        caps.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(std::iter::once(PathElement::new(
                caps,
                colour("cgroup").stroke_width(2),
            )))
            .map_err(err)?;
        for s in &pts {
            let p = (s.writer_median_mb_s.unwrap_or(0.0), y(s));
            let c = colour(&s.policy);
            chart
                .draw_series(std::iter::once(Circle::new(p, 6, c.filled())))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    s.policy.clone(),
                    (p.0 + xmax * 0.02, p.1 + ymax * 0.02),
                    ("sans-serif", 12).into_font(),
                )))
                .map_err(err)?;
        }
        if limit > 0.0 {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(0.0, limit), (xmax * 1.35, limit)],
                    RED.mix(0.4).stroke_width(1),
                )))
                .map_err(err)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// The run to show for a configuration: the one with the median time.
fn median_run<'a>(runs: &[&'a Run]) -> Option<&'a Run> {
    let mut v: Vec<&Run> = runs.to_vec();
    v.sort_by(|a, b| report::time_of(a).total_cmp(&report::time_of(b)));
    v.get(v.len().saturating_sub(1) / 2).copied()
}

/// Caps as a step line over [from, to]: percent of one CPU the writer may use.
fn cap_steps(r: &Run, from: f64, to: f64) -> Vec<(f64, f64)> {
    if r.policy.contains("auto-converge") {
        return r
            .qmp
            .iter()
            .map(|s| (s.t, 100.0 - s.throttle_pct))
            .collect();
    }
    let mut out = Vec::new();
    let fixed = r.policy.starts_with("cgroup") || r.policy.starts_with("cpulimit");
    if fixed {
        let v = r.caps.first().map_or(100.0, |p| p.v);
        return vec![(from, v), (to, v)];
    }
    let mut cur = 100.0;
    out.push((from, cur));
    for p in &r.caps {
        let v = if p.v <= 0.0 { 100.0 } else { p.v };
        let t = p.t.max(from);
        out.push((t, cur));
        out.push((t, v));
        cur = v;
    }
    out.push((to, cur));
    out
}

/// One row per policy: dirty rates and caps (left), QEMU's remaining bytes (right).
fn timelines(path: &Path, load: Load, configs: &[Config], runs: &[Run]) -> anyhow::Result<()> {
    let shown: Vec<&Run> = configs
        .iter()
        .filter(|c| c.load == load && c.policy != Policy::DirtyLimit)
        .filter_map(|c| {
            let rs: Vec<&Run> = runs.iter().filter(|r| r.key == c.key()).collect();
            median_run(&rs)
        })
        .collect();
    if shown.is_empty() {
        return Ok(());
    }
    let row_h = 240u32;
    let root =
        BitMapBackend::new(path, (1500, 40 + row_h * shown.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (head, body) = root.split_vertically(40);
    head.draw(&Text::new(
        format!(
            "{} workload, one run per policy (the median one): dirty rates and CPU allowed to the writer (left), QEMU's remaining bytes (right); t = 0 at migrate",
            load_name(load)
        ),
        (10, 12),
        ("sans-serif", 16).into_font(),
    ))
    .map_err(err)?;
    let rows = body.split_evenly((shown.len(), 1));
    let tmax = shown
        .iter()
        .map(|r| r.total_s.min(r.limit_s) + 3.0)
        .fold(10.0, f64::max);
    let from = -(SETTLE_S as f64) - 2.0;
    let rate_max = shown
        .iter()
        .flat_map(|r| {
            r.writer_rate
                .iter()
                .chain(&r.immp_rate)
                .map(|p| p.v)
                .chain(r.qmp.iter().map(|s| s.dirty_rate))
        })
        .fold(1e6, f64::max)
        / 1e6;
    let rem_max = shown
        .iter()
        .flat_map(|r| r.qmp.iter().map(|s| s.remaining))
        .fold(1e6, f64::max)
        / 1e6;
    for (area, r) in rows.iter().zip(&shown) {
        let (l, rt) = area.split_horizontally(1000);
        let title = format!(
            "{}: {}",
            r.policy,
            if r.completed {
                format!("{:.1} s", r.total_s)
            } else {
                format!("not converged at {:.0} s", r.total_s)
            }
        );
        let mut chart = ChartBuilder::on(&l)
            .caption(title, ("sans-serif", 15))
            .margin(6)
            .x_label_area_size(25)
            .y_label_area_size(45)
            .right_y_label_area_size(45)
            .build_cartesian_2d(from..tmax, 0.0..rate_max * 1.1)
            .map_err(err)?
            .set_secondary_coord(from..tmax, 0.0..105.0);
        chart
            .configure_mesh()
            .y_desc("MB/s")
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(err)?;
        chart
            .configure_secondary_axes()
            .y_desc("CPU %")
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(err)?;
        let clip = |v: &[super::Point]| -> Vec<(f64, f64)> {
            v.iter()
                .filter(|p| p.t >= from && p.t <= tmax)
                .map(|p| (p.t, p.v / 1e6))
                .collect()
        };
        let writer_c = RGBColor(30, 90, 200);
        chart
            .draw_series(LineSeries::new(
                clip(&r.writer_rate),
                writer_c.stroke_width(2),
            ))
            .map_err(err)?
            .label("writer dirty rate (its counter)")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], writer_c));
        if !r.immp_rate.is_empty() {
            let c = RGBColor(40, 170, 80);
            chart
                .draw_series(LineSeries::new(clip(&r.immp_rate), c.stroke_width(2)))
                .map_err(err)?
                .label("dirty rate measured by immp")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c));
        }
        let q: Vec<(f64, f64)> = r.qmp.iter().map(|s| (s.t, s.dirty_rate / 1e6)).collect();
        let qc = RGBColor(200, 60, 60);
        chart
            .draw_series(LineSeries::new(q, qc.stroke_width(1)))
            .map_err(err)?
            .label("QEMU dirty-pages-rate")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], qc));
        let cc = RGBColor(0, 0, 0);
        chart
            .draw_secondary_series(LineSeries::new(
                cap_steps(r, from, tmax),
                cc.mix(0.6).stroke_width(1),
            ))
            .map_err(err)?
            .label(if r.policy.contains("auto-converge") {
                "vCPU allowed (100 - QEMU throttle) % (right)"
            } else {
                "CPU cap of the writer % (right)"
            })
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], cc));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(err)?;
        let mut rc = ChartBuilder::on(&rt)
            .caption("QEMU remaining", ("sans-serif", 15))
            .margin(6)
            .x_label_area_size(25)
            .y_label_area_size(45)
            .build_cartesian_2d(0.0..tmax, 0.0..rem_max * 1.1)
            .map_err(err)?;
        rc.configure_mesh()
            .y_desc("MB")
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(err)?;
        rc.draw_series(LineSeries::new(
            r.qmp.iter().map(|s| (s.t, s.remaining / 1e6)),
            RGBColor(200, 60, 60).stroke_width(2),
        ))
        .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
