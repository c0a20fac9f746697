//! docker-compose.yml and the dashboards cannot run here (no Docker engine on the build
//! machines), so their structure is checked instead: every service it names exists,
//! references resolve, mounted files are in the repository, `VIEWKEEPER__…` overrides
//! name real config keys, connector registrations are what the Debezium source expects,
//! and every metric a dashboard queries is one the worker exports.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(format!("{REPO}/{path}")).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The config file as JSON (through the same TOML parser the worker's figment uses).
fn config_json(file: &str) -> Value {
    use figment::providers::{Format, Toml};
    figment::Figment::from(Toml::file(format!("{REPO}/config/{file}")))
        .extract()
        .unwrap()
}

#[test]
fn compose_services_reference_each_other_and_the_repository() {
    let c = yaml("docker-compose.yml");
    let services = c["services"].as_object().expect("services");
    for s in [
        "postgres",
        "redis",
        "elasticsearch",
        "kibana",
        "kafka",
        "connect",
        "connect-init",
        "prometheus",
        "grafana",
        "viewkeeper",
        "viewkeeper-debezium",
    ] {
        assert!(services.contains_key(s), "service {s} missing");
    }
    let volumes: BTreeSet<&str> = c["volumes"].as_object().unwrap().keys().map(String::as_str).collect();
    for (name, s) in services {
        // depends_on: a list or a map, of existing services.
        let deps: Vec<String> = match &s["depends_on"] {
            Value::Array(a) => a.iter().map(|v| v.as_str().unwrap().to_string()).collect(),
            Value::Object(m) => m.keys().cloned().collect(),
            _ => vec![],
        };
        for d in deps {
            assert!(services.contains_key(&d), "{name} depends on unknown service {d}");
        }
        for v in s["volumes"].as_array().into_iter().flatten() {
            let src = v.as_str().unwrap().split(':').next().unwrap();
            if let Some(rel) = src.strip_prefix("./") {
                assert!(Path::new(REPO).join(rel).exists(), "{name} mounts missing {src}");
            } else {
                assert!(volumes.contains(src), "{name} uses undeclared volume {src}");
            }
        }
        assert!(s.get("image").is_some() || s.get("build").is_some(), "{name}: no image");
    }
    let pg_cmd = services["postgres"]["command"].to_string();
    assert!(pg_cmd.contains("wal_level=logical"), "{pg_cmd}");
    assert!(Path::new(REPO).join("Dockerfile").exists());
}

#[test]
fn compose_overrides_name_real_config_keys() {
    let c = yaml("docker-compose.yml");
    for (svc, file) in [
        ("viewkeeper", "shop.toml"),
        ("viewkeeper-debezium", "shop-debezium.toml"),
    ] {
        let cfg = config_json(file);
        let env = c["services"][svc]["environment"].as_object().unwrap();
        let mut n = 0;
        for k in env.keys().filter(|k| k.starts_with("VIEWKEEPER__")) {
            let path: Vec<String> = k["VIEWKEEPER__".len()..]
                .split("__")
                .map(|p| p.to_lowercase())
                .collect();
            // Sections with defaults (http, engine) need not be in the file; the rest must.
            if path[0] == "http" || path[0] == "engine" {
                continue;
            }
            let mut v = &cfg;
            for p in &path {
                v = v
                    .get(p)
                    .unwrap_or_else(|| panic!("{svc}: {k}: no key {path:?} in config/{file}"));
            }
            n += 1;
        }
        assert!(n >= 5, "{svc}: overrides checked: {n}");
    }
}

#[test]
fn connector_registrations_match_the_debezium_source() {
    let cfg = config_json("shop-debezium.toml");
    for (source, tables) in [
        ("identity", vec!["public.customers"]),
        ("catalog", vec!["public.products"]),
        ("ordering", vec!["public.orders", "public.order_items"]),
    ] {
        let path = format!("{REPO}/config/debezium/{source}.json");
        let c: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(c["topic.prefix"], cfg["sources"][source]["topic_prefix"], "{path}");
        assert_eq!(c["value.converter"], "org.apache.kafka.connect.json.JsonConverter");
        assert_eq!(c["plugin.name"], "pgoutput");
        let include = c["table.include.list"].as_str().unwrap();
        for t in tables {
            assert!(include.split(',').any(|i| i == t), "{path}: {t} not included");
        }
    }
}

#[test]
fn dashboards_query_only_exported_metrics() {
    // Every metric name the code exports, as written in it.
    let mut code = String::new();
    for dir in ["src", "connectors/src"] {
        for e in walk(&Path::new(REPO).join(dir)) {
            code.push_str(&std::fs::read_to_string(e).unwrap());
        }
    }
    let g: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{REPO}/config/dashboards/grafana-viewkeeper.json")).unwrap(),
    )
    .unwrap();
    let mut used = BTreeSet::new();
    for p in g["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(base) = word.strip_prefix("viewkeeper_") {
                    let base = base.strip_suffix("_bucket").unwrap_or(base);
                    used.insert(format!("viewkeeper_{base}"));
                }
            }
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    for m in &used {
        assert!(
            code.contains(&format!("\"{m}\"")),
            "dashboard queries {m}, which no code exports"
        );
    }
    // Kibana saved objects: one JSON object per line, the data view on the alias.
    let text = std::fs::read_to_string(format!("{REPO}/config/dashboards/kibana-orders-view.ndjson")).unwrap();
    let objs: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let alias = config_json("shop.toml")["projections"]["orders_view"]["index"]["alias"].clone();
    assert!(objs
        .iter()
        .any(|o| o["type"] == "index-pattern" && o["attributes"]["title"] == alias));
    assert!(objs.iter().any(|o| o["type"] == "dashboard"));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// A clone holds everything its tests read: no tracked file refers to a folder beside the
/// repository (the Debezium fixtures were read from one, so a fresh clone failed its tests).
#[test]
fn nothing_in_the_repository_reads_from_beside_it() {
    let out = std::process::Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(REPO)
        .output()
        .expect("git ls-files");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let files: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .split('\0')
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect();
    assert!(files.iter().any(|f| f.ends_with("SOURCES.md")), "fixtures are tracked");
    let beside = ["..", "/shared"].concat();
    let mut offenders = Vec::new();
    for f in &files {
        let Ok(text) = std::fs::read_to_string(format!("{REPO}/{f}")) else {
            continue; // binary
        };
        if text.contains(&beside) {
            offenders.push(f.clone());
        }
    }
    assert!(
        offenders.is_empty(),
        "files reading from beside the repository: {offenders:?}"
    );
}
