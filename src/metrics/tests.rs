//! Tests of the registry, its series and their exposition.

use crate::metrics::registry::*;
use crate::metrics::text::fmt_f64;
use std::sync::Arc;

#[test]
fn counter_gauge_render() {
    let r = Registry::new();
    let c = r
        .counter("http_requests_total", "Requests.", &["status", "upstream"])
        .unwrap();
    c.series(&["200", "a:1"]).unwrap().inc(1.0);
    c.series(&["200", "a:1"]).unwrap().inc(2.0);
    c.series(&["500", "a:1"]).unwrap().inc_by(1);
    c.series(&["200", "a:1"]).unwrap().inc(0.5);
    let g = r.gauge("in_flight", "In flight.", &[]).unwrap();
    g.series::<&str>(&[]).unwrap().set(3.0);
    g.series::<&str>(&[]).unwrap().inc(-1.0);
    assert_eq!(
        r.render(),
        "# HELP http_requests_total Requests.\n# TYPE http_requests_total counter\n\
         http_requests_total{status=\"200\",upstream=\"a:1\"} 3.5\n\
         http_requests_total{status=\"500\",upstream=\"a:1\"} 1\n\
         # HELP in_flight In flight.\n# TYPE in_flight gauge\nin_flight 2\n"
    );
}

#[test]
fn escaping() {
    let r = Registry::new();
    let c = r.counter("x", "a \\ b\nc \"q\"", &["v"]).unwrap();
    c.series(&["a\"b\\c\nd"]).unwrap().inc(1.0);
    c.series_bytes(&[b"bad \xff utf8"]).unwrap().inc(1.0);
    assert_eq!(
        r.render(),
        "# HELP x a \\\\ b\\nc \"q\"\n# TYPE x counter\n\
         x{v=\"a\\\"b\\\\c\\nd\"} 1\nx{v=\"bad \u{fffd} utf8\"} 1\n"
    );
}

#[test]
fn histogram_buckets_are_cumulative() {
    let r = Registry::new();
    let h = r
        .histogram(
            "lat_seconds",
            "Latency.",
            &["up"],
            Some(&[0.1, 1.0, f64::INFINITY]),
        )
        .unwrap();
    let s = h.series(&["a"]).unwrap();
    for v in [0.05, 0.1, 0.5, 2.0, 3.0] {
        s.observe(v);
    }
    assert_eq!(s.cumulative(), vec![2, 3, 5]);
    let sum = 0.05 + 0.1 + 0.5 + 2.0 + 3.0;
    assert_eq!(
        r.render(),
        format!(
            "# HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n\
             lat_seconds_bucket{{up=\"a\",le=\"0.1\"}} 2\n\
             lat_seconds_bucket{{up=\"a\",le=\"1\"}} 3\n\
             lat_seconds_bucket{{up=\"a\",le=\"+Inf\"}} 5\n\
             lat_seconds_sum{{up=\"a\"}} {sum}\n\
             lat_seconds_count{{up=\"a\"}} 5\n"
        )
    );
    let d = r.histogram("d", "", &[], None).unwrap();
    assert_eq!(d.buckets(), DEFAULT_BUCKETS);
    d.series::<&str>(&[]).unwrap().observe(0.005);
    let text = r.render();
    assert!(text.contains("d_bucket{le=\"0.005\"} 1\n"), "{text}");
    assert!(text.contains("d_bucket{le=\"0.01\"} 1\n"), "{text}");
    assert!(
        text.contains("d_bucket{le=\"+Inf\"} 1\nd_sum 0.005\nd_count 1\n"),
        "{text}"
    );
}

#[test]
fn names_and_conflicts() {
    let r = Registry::new();
    for bad in ["", "1x", "a-b", "a b", "é"] {
        assert!(r.counter(bad, "", &[]).is_err(), "{bad}");
    }
    assert!(r.counter("ns:sub_total", "", &[]).is_ok());
    for bad in ["", "1x", "a:b", "__x", "a-b"] {
        assert!(r.counter("c", "", &[bad]).is_err(), "{bad}");
    }
    assert!(r.counter("c", "", &["a", "a"]).is_err());
    assert!(r.histogram("h", "", &["le"], None).is_err());
    assert!(r.histogram("h", "", &[], Some(&[1.0, 1.0])).is_err());
    assert!(r.histogram("h", "", &[], Some(&[2.0, 1.0])).is_err());
    assert!(r.histogram("h", "", &[], Some(&[f64::NAN])).is_err());

    let a = r.counter("req_total", "one", &["s"]).unwrap();
    let b = r.counter("req_total", "two", &["s"]).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    let e = r.gauge("req_total", "", &["s"]).err().unwrap();
    assert_eq!(
        e,
        "metric 'req_total' exists already as a counter with labels (s)"
    );
    assert!(r.counter("req_total", "", &["t"]).is_err());
    assert!(r.counter("req_total", "", &[]).is_err());

    let h = r.histogram("lat", "", &[], Some(&[1.0])).unwrap();
    assert!(Arc::ptr_eq(
        &h,
        &r.histogram("lat", "", &[], Some(&[1.0])).unwrap()
    ));
    assert!(r.histogram("lat", "", &[], None).is_err());
    let e = r.counter("lat_count", "", &[]).err().unwrap();
    assert_eq!(
        e,
        "metric 'lat_count' would render 'lat_count', which histogram 'lat' renders"
    );
    r.gauge("g_sum", "", &[]).unwrap();
    assert!(r.histogram("g", "", &[], None).is_err());

    let e = a.series(&["1", "2"]).err().unwrap();
    assert_eq!(e, "counter 'req_total': expected 1 label value (s), got 2");
}

#[test]
fn remove_and_reset() {
    let r = Registry::new();
    let c = r.counter("c", "", &["k"]).unwrap();
    c.series(&["a"]).unwrap().inc(1.0);
    c.series(&["b"]).unwrap().inc(1.0);
    let e = c.epoch();
    assert!(c.remove(&["a"]).unwrap());
    assert!(!c.remove(&["a"]).unwrap());
    assert!(c.epoch() > e);
    assert_eq!(r.render(), "# HELP c \n# TYPE c counter\nc{k=\"b\"} 1\n");
    c.reset();
    assert_eq!(r.render(), "# HELP c \n# TYPE c counter\n");
    let g = r.gauge("g", "", &[]).unwrap();
    g.series::<&str>(&[]).unwrap().set(5.0);
    g.reset();
    assert!(r.render().ends_with("# TYPE g gauge\ng 0\n"));
}

#[test]
fn callback_metrics() {
    let r = Registry::new();
    r.callback(Kind::Gauge, "dict_bytes", "Bytes.", &["dict"], |emit| {
        emit(&["b"], 2.0);
        emit(&["a"], 1.0);
        emit(&["a", "extra"], 9.0);
    })
    .unwrap();
    assert_eq!(
        r.render(),
        "# HELP dict_bytes Bytes.\n# TYPE dict_bytes gauge\ndict_bytes{dict=\"a\"} 1\ndict_bytes{dict=\"b\"} 2\n"
    );
    assert!(r.gauge("dict_bytes", "", &["dict"]).is_err());
    assert!(r.find("dict_bytes").unwrap().series(&["a"]).is_err());
}

#[test]
fn series_cache() {
    let r = Registry::new();
    let c = r.counter("c", "", &["k", "v"]).unwrap();
    let mut cache = SeriesCache::new(c.clone());
    for _ in 0..3 {
        cache.with(&["a", ""], |s| s.inc_by(1)).unwrap();
    }
    cache.with(&[&b"a"[..], b"\xff"], |s| s.inc(1.0)).unwrap();
    assert!(cache.with(&["a"], |s| s.inc(1.0)).is_err());
    assert_eq!(c.series(&["a", ""]).unwrap().value(), 3.0);
    c.remove(&["a", ""]).unwrap();
    cache.with(&["a", ""], |s| s.inc_by(1)).unwrap();
    assert_eq!(c.series(&["a", ""]).unwrap().value(), 1.0);
    assert_eq!(c.series(&["a", "\u{fffd}"]).unwrap().value(), 1.0);
    let mut key = Vec::new();
    for v in [&b"200"[..], b"", b"a\xffb"] {
        push_key(&mut key, v);
    }
    assert_eq!(split_key(&key), vec![&b"200"[..], b"", b"a\xffb"]);
}

#[test]
fn values_format() {
    let mut s = String::new();
    for v in [
        1.0,
        0.1,
        1e21,
        -0.5,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        1e-7,
    ] {
        fmt_f64(&mut s, v);
        s.push(' ');
    }
    assert_eq!(
        s,
        "1 0.1 1000000000000000000000 -0.5 +Inf -Inf NaN 0.0000001 "
    );
}

#[test]
fn concurrent_updates_sum_exactly() {
    let r = Arc::new(Registry::new());
    let c = r.counter("hits_total", "", &["k"]).unwrap();
    let h = r.histogram("obs", "", &["k"], Some(&[1.0, 2.0])).unwrap();
    let g = r.gauge("level", "", &[]).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (c, h, g) = (c.clone(), h.clone(), g.clone());
            std::thread::spawn(move || {
                for i in 0..20_000u64 {
                    let k = if i % 2 == 0 { "even" } else { "odd" };
                    c.series(&[k]).unwrap().inc(1.0);
                    c.series(&["frac"]).unwrap().inc(0.25);
                    h.series(&[k]).unwrap().observe(((i + t) % 3) as f64);
                    g.series::<&str>(&[]).unwrap().inc(1.0);
                    g.series::<&str>(&[]).unwrap().inc(-0.5);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(c.series(&["even"]).unwrap().value(), 80_000.0);
    assert_eq!(c.series(&["odd"]).unwrap().value(), 80_000.0);
    assert_eq!(c.series(&["frac"]).unwrap().value(), 40_000.0);
    assert_eq!(g.series::<&str>(&[]).unwrap().value(), 80_000.0);
    let (e, o) = (h.series(&["even"]).unwrap(), h.series(&["odd"]).unwrap());
    assert_eq!(e.cumulative()[2] + o.cumulative()[2], 160_000);
    let (mut want_sum, mut want_le1) = (0.0, 0);
    for t in 0..8u64 {
        for i in 0..20_000u64 {
            want_sum += ((i + t) % 3) as f64;
            want_le1 += ((i + t) % 3 <= 1) as u64;
        }
    }
    assert_eq!(e.cumulative()[0] + o.cumulative()[0], want_le1);
    assert_eq!(e.value() + o.value(), want_sum);
}
