//! `scripts/local-cluster.sh`: Redis, three nodes and nginx (from the same template
//! as docker-compose) on loopback. Clients connected through the load balancer land
//! on different nodes and exchange messages.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{Client, WAIT, free_port};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_through_the_load_balancer_reach_each_other_across_nodes() {
    let lb = free_port();
    let nodes = [free_port(), free_port(), free_port()];
    let mut script = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/local-cluster.sh"
        ))
        .env("LB_PORT", lb.to_string())
        .env("REDIS_PORT", free_port().to_string())
        .env("NODE_PORTS", nodes.map(|p| p.to_string()).join(" "))
        .env("WSRELAY_BIN", env!("CARGO_BIN_EXE_wsrelay"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("bash");
    let stdout = script.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("ready:") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(WAIT * 3).expect("local cluster ready");

    // least_conn spreads open connections: keep connecting until two nodes are seen.
    let url = format!("ws://127.0.0.1:{lb}/ws?channel=room");
    let mut by_node: HashMap<String, Client> = HashMap::new();
    for _ in 0..12 {
        let client = Client::connect(&url).await;
        let node = client.welcome["node"].as_str().unwrap().to_owned();
        by_node.entry(node).or_insert(client);
        if by_node.len() >= 2 {
            break;
        }
    }
    assert!(
        by_node.len() >= 2,
        "all connections landed on one node: {:?}",
        by_node.keys()
    );
    let mut clients: Vec<(String, Client)> = by_node.into_iter().collect();
    let (from_node, publisher) = &mut clients[0];
    let from_node = from_node.clone();
    publisher
        .send(json!({"op":"pub","ch":"room","data":{"from": from_node}}))
        .await;
    let (to_node, receiver) = &mut clients[1];
    assert_ne!(&from_node, to_node);
    assert_eq!(receiver.recv().await["data"]["from"], json!(from_node));

    // Readiness through the load balancer, then stop: the script cleans up.
    let (status, _) = common::http_get(format!("127.0.0.1:{lb}").parse().unwrap(), "/readyz").await;
    assert_eq!(status, 200);
    let _ = Command::new("kill")
        .args(["-TERM", &script.id().to_string()])
        .status();
    tokio::task::spawn_blocking(move || script.wait())
        .await
        .unwrap()
        .unwrap();
    for port in nodes {
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "node on {port} stopped with the script"
        );
    }
}
