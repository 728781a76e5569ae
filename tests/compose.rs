//! The docker-compose stack, checked without a Docker engine: every service, port, variable,
//! mounted file and address that `docker-compose.yml`, the Dockerfile and the configs it mounts
//! refer to exists and agrees with the others and with the binary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load(path: &str) -> Yaml {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    resolve_merges(docs.remove(0))
}

/// Applies YAML merge keys (`<<: *anchor` or `<<: [*a, *b]`) as Compose does; explicit keys win.
fn resolve_merges(doc: Yaml) -> Yaml {
    match doc {
        Yaml::Hash(hash) => {
            let mut merged = yaml_rust2::yaml::Hash::new();
            let mut own = Vec::new();
            for (k, v) in hash {
                let v = resolve_merges(v);
                if k.as_str() == Some("<<") {
                    let sources = match v {
                        Yaml::Array(items) => items,
                        one => vec![one],
                    };
                    for source in sources {
                        if let Yaml::Hash(h) = source {
                            merged.extend(h);
                        }
                    }
                } else {
                    own.push((k, v));
                }
            }
            merged.extend(own);
            Yaml::Hash(merged)
        }
        Yaml::Array(items) => Yaml::Array(items.into_iter().map(resolve_merges).collect()),
        other => other,
    }
}

fn text(y: &Yaml) -> String {
    match y {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn keys(y: &Yaml) -> Vec<String> {
    y.as_hash().map(|h| h.keys().map(text).collect()).unwrap_or_default()
}

fn list(y: &Yaml) -> Vec<String> {
    y.as_vec().map(|v| v.iter().map(text).collect()).unwrap_or_default()
}

fn environment(service: &Yaml) -> BTreeMap<String, String> {
    service["environment"].as_hash().map(|h| h.iter().map(|(k, v)| (text(k), text(v))).collect()).unwrap_or_default()
}

/// `host:port` of an address or URL.
fn host_port(address: &str) -> (String, u16) {
    let rest = address.split("://").last().unwrap();
    let hostport = rest.split('/').next().unwrap();
    let (host, port) = hostport.rsplit_once(':').unwrap_or_else(|| panic!("no port in {address}"));
    (host.to_owned(), port.parse().unwrap_or_else(|_| panic!("port of {address}")))
}

struct Stack {
    compose: Yaml,
    services: BTreeMap<String, Yaml>,
}

impl Stack {
    fn load() -> Self {
        let compose = load("docker-compose.yml");
        let services = compose["services"].as_hash().expect("services").iter().map(|(k, v)| (text(k), v.clone())).collect();
        Self { compose, services }
    }

    fn service(&self, name: &str) -> &Yaml {
        self.services.get(name).unwrap_or_else(|| panic!("no service {name:?} in docker-compose.yml"))
    }

    /// The ports a service listens on inside its container.
    fn container_ports(&self, name: &str) -> BTreeSet<u16> {
        let service = self.service(name);
        let mut ports: BTreeSet<u16> =
            list(&service["ports"]).iter().map(|p| p.rsplit(':').next().unwrap().parse().unwrap()).collect();
        if is_catalog(service) {
            ports.insert(catalog_port());
        }
        ports.extend(KNOWN_PORTS.iter().filter(|(s, _)| *s == name).map(|(_, p)| *p));
        ports
    }

    /// (path on the host, path in the container) of every bind mount of a service.
    fn mounts(&self, name: &str) -> Vec<(String, String)> {
        list(&self.service(name)["volumes"])
            .iter()
            .filter(|v| v.starts_with("./"))
            .map(|v| {
                let mut parts = v.split(':');
                (parts.next().unwrap().to_owned(), parts.next().expect("a container path").to_owned())
            })
            .collect()
    }

    /// The host file mounted at `container_path` (or inside a mounted folder) of a service.
    fn host_file(&self, name: &str, container_path: &str) -> PathBuf {
        for (host, inside) in self.mounts(name) {
            if let Some(rest) = container_path.strip_prefix(&inside) {
                return root().join(host.trim_start_matches("./")).join(rest.trim_start_matches('/'));
            }
        }
        panic!("{container_path} is not mounted into {name}")
    }
}

/// Ports the images themselves listen on that compose does not publish: the collector's
/// Prometheus exporter and Jaeger's OTLP gRPC receiver.
const KNOWN_PORTS: [(&str, u16); 2] = [("otel-collector", 8889), ("jaeger", 4317)];

fn is_catalog(service: &Yaml) -> bool {
    service["image"].as_str() == Some(catalog_image().as_str())
}

fn catalog_image() -> String {
    let stack = Stack::load();
    let builder = stack.services.values().find(|s| !s["build"].is_badvalue()).expect("one service builds the image");
    text(&builder["image"])
}

/// The port the image's `CATALOG_ADDR` binds.
fn catalog_port() -> u16 {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let addr =
        dockerfile.split("CATALOG_ADDR=").nth(1).expect("the Dockerfile sets CATALOG_ADDR").split_whitespace().next().unwrap();
    host_port(addr).1
}

#[test]
fn the_dockerfile_builds_the_binary_and_runs_it_small() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage: {stages:?}");
    assert!(stages[1].contains("slim"), "a small runtime image: {}", stages[1]);
    assert!(dockerfile.contains("--bin catalog"), "builds the binary this package names");
    assert!(dockerfile.contains("--locked"), "from Cargo.lock");
    assert!(dockerfile.contains(&format!("EXPOSE {}", catalog_port())), "EXPOSE matches CATALOG_ADDR");
    let toolchain = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain.split("channel = \"").nth(1).unwrap().split('"').next().unwrap();
    let minor = channel.rsplitn(2, '.').last().unwrap();
    assert!(
        stages[0].contains(&format!("rust:{minor}")),
        "the build image is the toolchain rust-toolchain.toml pins: {}",
        stages[0]
    );
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "target"), "the build context leaves out target/");
}

#[test]
fn every_service_has_an_image_and_its_references_exist() {
    let stack = Stack::load();
    for name in ["localstack", "infra-init", "catalog-worker", "catalog-api", "otel-collector", "jaeger", "prometheus", "grafana"]
    {
        stack.service(name);
    }
    let declared_volumes = keys(&stack.compose["volumes"]);
    let mut host_ports = BTreeMap::new();
    for (name, service) in &stack.services {
        assert!(service["image"].as_str().is_some(), "{name} names its image");
        if let Some(context) = service["build"].as_str() {
            assert!(root().join(context).join("Dockerfile").is_file(), "{name} builds from a Dockerfile in {context}");
        }
        for dependency in keys(&service["depends_on"]).into_iter().chain(list(&service["depends_on"])) {
            let target = stack.service(&dependency);
            if let Some(condition) = service["depends_on"][dependency.as_str()]["condition"].as_str() {
                assert!(
                    ["service_started", "service_healthy", "service_completed_successfully"].contains(&condition),
                    "{name}: {condition}"
                );
                if condition == "service_healthy" {
                    assert!(
                        !target["healthcheck"].is_badvalue(),
                        "{name} waits for {dependency} to be healthy: it needs a healthcheck"
                    );
                }
            }
        }
        for volume in list(&service["volumes"]) {
            let host = volume.split(':').next().unwrap();
            if host.starts_with("./") {
                assert!(root().join(host.trim_start_matches("./")).exists(), "{name} mounts {host}, which is not in the repo");
            } else {
                assert!(declared_volumes.contains(&host.to_owned()), "{name} uses volume {host}, not declared");
            }
        }
        for port in list(&service["ports"]) {
            let host = port.split(':').next().unwrap().to_owned();
            if let Some(other) = host_ports.insert(host.clone(), name.clone()) {
                panic!("host port {host} published by {other} and {name}");
            }
        }
    }
}

#[test]
fn every_address_names_a_service_on_a_port_it_listens_on() {
    let stack = Stack::load();
    let mut addresses: Vec<(String, String)> = Vec::new();
    for (name, service) in &stack.services {
        for (key, value) in environment(service) {
            if value.starts_with("http://") {
                addresses.push((format!("{name} {key}"), value));
            }
        }
    }
    let prometheus = load("deploy/prometheus.yml");
    for job in prometheus["scrape_configs"].as_vec().unwrap() {
        for config in job["static_configs"].as_vec().unwrap() {
            addresses.extend(list(&config["targets"]).into_iter().map(|t| ("prometheus scrape".to_owned(), t)));
        }
    }
    let collector = load("deploy/otel-collector.yaml");
    for (exporter, config) in collector["exporters"].as_hash().unwrap() {
        if let Some(endpoint) = config["endpoint"].as_str()
            && !endpoint.starts_with("0.0.0.0")
        {
            addresses.push((format!("collector exporter {}", text(exporter)), endpoint.to_owned()));
        }
    }
    let datasources = load("deploy/grafana/provisioning/datasources/datasources.yml");
    for ds in datasources["datasources"].as_vec().unwrap() {
        addresses.push((format!("grafana datasource {}", text(&ds["name"])), text(&ds["url"])));
    }
    assert!(addresses.len() >= 8, "{addresses:?}");
    for (who, address) in addresses {
        let (host, port) = host_port(&address);
        let ports = stack.container_ports(&host);
        assert!(ports.contains(&port), "{who}: {address}, but {host} listens on {ports:?}");
    }
    // The collector listens where the catalog sends, and sends where it says it listens.
    let otlp = text(&collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"]);
    assert_eq!(host_port(&otlp).1, 4318);
    let prom_exporter = text(&collector["exporters"]["prometheus"]["endpoint"]);
    assert!(stack.container_ports("otel-collector").contains(&host_port(&prom_exporter).1));
}

#[test]
fn the_collector_pipelines_use_what_it_defines() {
    let collector = load("deploy/otel-collector.yaml");
    let defined = |section: &str| keys(&collector[section]);
    for (pipeline, config) in collector["service"]["pipelines"].as_hash().unwrap() {
        for section in ["receivers", "processors", "exporters"] {
            for component in list(&config[section]) {
                assert!(
                    defined(section).contains(&component),
                    "pipeline {}: {section} {component} is not defined",
                    text(pipeline)
                );
            }
        }
    }
    let pipelines = keys(&collector["service"]["pipelines"]);
    assert!(pipelines.contains(&"traces".to_owned()) && pipelines.contains(&"metrics".to_owned()), "{pipelines:?}");
}

#[test]
fn every_variable_is_one_the_binary_or_the_docs_know() {
    let stack = Stack::load();
    let help = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_catalog")).args(args).arg("--help").output().unwrap();
        assert!(out.status.success(), "catalog {args:?} --help");
        String::from_utf8(out.stdout).unwrap()
    };
    let observability = std::fs::read_to_string(root().join("docs/observability.md")).unwrap();
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let image_env: Vec<String> = dockerfile
        .split("ENV ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, _)| k.to_owned())
        .collect();
    for (name, service) in &stack.services {
        if !is_catalog(service) {
            continue;
        }
        let command = list(&service["command"]);
        let subcommand: Vec<&str> = command.iter().take_while(|a| !a.starts_with("--")).map(String::as_str).collect();
        // The arguments compose passes parse: clap checks them before it prints the help.
        let usage = help(&command.iter().map(String::as_str).collect::<Vec<_>>());
        let mut vars: Vec<String> = environment(service).into_keys().collect();
        // The image's own variables are for its default command, `serve`.
        if subcommand == ["serve"] {
            vars.extend(image_env.iter().cloned());
        }
        for var in vars {
            if var.starts_with("CATALOG_") {
                let global = help(&[]);
                assert!(
                    usage.contains(&format!("env: {var}=")) || global.contains(&format!("env: {var}=")),
                    "{name}: {var} is not a variable of `catalog {}`",
                    subcommand.join(" ")
                );
            } else if var.starts_with("OTEL_") {
                assert!(observability.contains(&format!("`{var}`")), "{name}: {var} is not in docs/observability.md");
            } else {
                assert!(var.starts_with("AWS_"), "{name}: what reads {var}?");
            }
        }
    }
}

#[test]
fn grafana_provisions_the_dashboard_and_its_datasources() {
    let stack = Stack::load();
    let provider = load("deploy/grafana/provisioning/dashboards/catalog.yml");
    let folder = text(&provider["providers"][0]["options"]["path"]);
    let dashboard_file = stack.host_file("grafana", &format!("{folder}/catalog.json"));
    assert!(dashboard_file.is_file(), "{}", dashboard_file.display());
    let provisioning = stack.host_file("grafana", "/etc/grafana/provisioning/dashboards/catalog.yml");
    assert!(
        provisioning.ends_with(Path::new("deploy/grafana/provisioning/dashboards/catalog.yml")),
        "{}",
        provisioning.display()
    );
    let home = &environment(stack.service("grafana"))["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"];
    assert_eq!(stack.host_file("grafana", home), dashboard_file);

    let datasources = load("deploy/grafana/provisioning/datasources/datasources.yml");
    let uids: Vec<String> = datasources["datasources"].as_vec().unwrap().iter().map(|d| text(&d["uid"])).collect();
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&dashboard_file).unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        let uid = panel["datasource"]["uid"].as_str().unwrap();
        assert!(uids.contains(&uid.to_owned()), "panel {} uses datasource {uid}, not provisioned", panel["title"]);
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], panel["datasource"]["uid"]);
        }
    }
}
