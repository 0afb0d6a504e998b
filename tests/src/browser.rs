//! A page as a real browser shows it: Debian's Chromium, headless, renders a file and gives
//! back the DOM it built, a screenshot, and what its console said (every message a page's
//! scripts or loads raise is logged as `CONSOLE`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Proc;

/// The Chromium binary: `CT_CHROMIUM`, else `chromium` or `chromium-browser` on the PATH.
pub fn chromium() -> PathBuf {
    if let Ok(path) = std::env::var("CT_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            if dir.join(name).is_file() {
                return dir.join(name);
            }
        }
    }
    panic!(
        "no Chromium: install Debian's `chromium` (apt-get install chromium; .ci/run does) or \
         set CT_CHROMIUM to a Chromium binary"
    )
}

/// What Chromium made of a page.
pub struct Rendered {
    /// The DOM after parsing, serialised.
    pub dom: String,
    /// The screenshot (PNG) of the top `height` pixels, 1200 wide.
    pub screenshot: PathBuf,
    /// Console messages (errors included), one per line.
    pub console: Vec<String>,
}

fn run(page: &Path, work: &Path, tag: &str, extra: &[String]) -> Proc {
    let profile = work.join(format!("profile-{tag}"));
    let mut args = vec![
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--hide-scrollbars".into(),
        "--enable-logging=stderr".into(),
        "--v=0".into(),
        format!("--user-data-dir={}", profile.display()),
    ];
    args.extend(extra.iter().cloned());
    args.push(format!("file://{}", page.display()));
    let mut p = Proc::start_env(&chromium(), &args, &[], work, tag);
    assert!(p.wait(Duration::from_secs(180)).success(), "chromium: {}", p.stderr());
    p
}

/// Renders `page` (an absolute path) twice: once for its DOM, once for a screenshot
/// `height` pixels tall; scratch files and the screenshot go into `work`.
pub fn render(page: &Path, work: &Path, height: u32) -> Rendered {
    let dom = run(page, work, "chromium-dom", &["--dump-dom".into()]);
    let screenshot = work.join("screenshot.png");
    let shot = run(
        page,
        work,
        "chromium-shot",
        &[format!("--window-size=1200,{height}"), format!("--screenshot={}", screenshot.display())],
    );
    let console = [dom.stderr(), shot.stderr()]
        .iter()
        .flat_map(|log| {
            log.lines().filter(|l| l.contains(":CONSOLE")).map(str::to_string).collect::<Vec<_>>()
        })
        .collect();
    Rendered { dom: dom.stdout(), screenshot, console }
}

/// The share of a PNG's pixels in a saturated colour (max − min channel over 60): a page
/// whose figures were drawn has many, text on white has almost none.
pub fn coloured_share(png_path: &Path) -> f64 {
    let file = std::fs::File::open(png_path).expect("screenshot");
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let channels = info.color_type.samples();
    assert!(channels >= 3, "a colour screenshot, got {:?}", info.color_type);
    let pixels = &buf[..info.buffer_size()];
    let (mut coloured, mut total) = (0usize, 0usize);
    for px in pixels.chunks_exact(channels) {
        let (max, min) = (px[..3].iter().max(), px[..3].iter().min());
        if let (Some(&max), Some(&min)) = (max, min) {
            total += 1;
            if max - min > 60 {
                coloured += 1;
            }
        }
    }
    coloured as f64 / total.max(1) as f64
}

/// Renders `<summary>/report.html` and checks what every report must show in a browser: the
/// sections `sections` and the figures `figures` (their file stems, as the page ids them),
/// every inline SVG of the file parsed as an SVG element, nothing said on the console, and
/// figures drawn in colour on the first screen.
pub fn check_report(summary: &Path, sections: &[&str], figures: &[&str]) -> Rendered {
    let page = summary.join("report.html");
    let html = std::fs::read_to_string(&page).expect("report.html written");
    let page = page.canonicalize().expect("absolute path");
    let work = tempfile::tempdir().expect("tmp");
    let rendered = render(&page, work.path(), 2400);
    assert!(rendered.console.is_empty(), "console: {:?}", rendered.console);
    for id in sections {
        assert!(rendered.dom.contains(&format!("<section id=\"{id}\">")), "section {id}");
    }
    for stem in figures {
        assert!(rendered.dom.contains(&format!("<figure id=\"fig-{stem}\"><svg")), "figure {stem}");
    }
    let svgs = html.matches("<svg").count();
    assert!(svgs >= figures.len(), "{svgs} SVGs");
    assert_eq!(rendered.dom.matches("<svg").count(), svgs, "every SVG in the DOM");
    let share = coloured_share(&rendered.screenshot);
    // The first 2400 px hold the settings, the headline and Figure 2's first maps; a page
    // whose SVGs did not draw is text on white, under 0.1% coloured.
    assert!(share > 0.005, "{share} of the screenshot in colour");
    // Keep the screenshot beside the report, to look at.
    std::fs::copy(&rendered.screenshot, summary.join("report-screenshot.png")).expect("copy");
    Rendered { screenshot: summary.join("report-screenshot.png"), ..rendered }
}
