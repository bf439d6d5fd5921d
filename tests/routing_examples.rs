//! The routing examples shipped in session-config/ do what they say, in a
//! real PipeWire 1.x and WirePlumber 0.5: each is loaded as a user would
//! (only the device names are this test's) and its effect checked.

mod common;

use common::*;
use std::time::Duration;

/// A second null sink (and its monitor as a source) to route to.
const SECOND_SINK: &str = r#"
context.objects = [
  { factory = adapter
    args = { factory.name = support.null-audio-sink node.name = "second-sink"
             node.description = "Second Sink" media.class = "Audio/Sink"
             object.linger = true audio.position = [ FL FR ] } }
]
"#;

/// What `node`'s output port FL is linked to.
fn linked_to(env: &PwEnv, node: &str) -> String {
    let links = env.links();
    let mut lines = links.lines();
    let port = format!("{node}:output_FL");
    while let Some(l) = lines.next() {
        if l.trim() == port {
            return lines.next().unwrap_or_default().trim().trim_start_matches("|->").trim().to_string();
        }
    }
    String::new()
}

/// Starts work-vm and `other` playing; work-vm must be linked to the
/// second sink, `other` to the default one. Returns both guests.
fn play_and_check_routes(env: &PwEnv, sock: &std::path::Path, other: &str) -> [std::process::Child; 2] {
    let (work_node, other_node) =
        ("xen-vsnd.work-vm.0.0.playback".to_string(), format!("xen-vsnd.{other}.0.0.playback"));
    let guests = [
        spawn_playing_guest(env, sock, "work-vm", 3.0, &[]),
        spawn_playing_guest(env, sock, other, 3.0, &[]),
    ];
    wait_until("both guests linked", Duration::from_secs(10), || {
        !linked_to(env, &work_node).is_empty() && !linked_to(env, &other_node).is_empty()
    });
    assert_eq!(linked_to(env, &work_node), "second-sink:playback_FL", "{}", env.links());
    assert_eq!(linked_to(env, &other_node), format!("{SINK}:playback_FL"), "{}", env.links());
    guests
}

#[test]
fn the_pipewire_client_rules_example_routes_one_vm_to_its_sink() {
    let example = include_str!("../session-config/51-xen-vsnd.conf")
        .replace("alsa_output.usb-headset.analog-stereo", "second-sink");
    let mut env = PwEnv::start_with_conf(SECOND_SINK);
    // Where a serve run by this user finds it (XDG_CONFIG_HOME).
    let dir = env.dir.path().join("config/pipewire/client.conf.d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("51-xen-vsnd.conf"), example).unwrap();
    let (sock, _log) = env.start_backend();
    let guests = play_and_check_routes(&env, &sock, "other-vm");
    for g in guests {
        let (ok, _, err) = finish_sim(g);
        assert!(ok, "{err}");
    }
}

#[test]
fn the_policy_example_routes_allows_and_caps() {
    let example = include_str!("../session-config/config.toml")
        .replace("alsa_output.usb-headset.analog-stereo", "second-sink")
        .replace("alsa_input.usb-headset.mono-fallback", "second-sink");
    let mut env = PwEnv::start_with_conf(SECOND_SINK);
    let policy = env.dir.path().join("config.toml");
    std::fs::write(&policy, example).unwrap();
    let (sock, _log) = env.start_backend_with(&["--config", policy.to_str().unwrap()]);
    let guests = play_and_check_routes(&env, &sock, "untrusted-vm");
    let out = env.run(BIN, &["status", "--json", "--control", &format!("{}.control", sock.display())]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let find = |node: &str| {
        status["streams"].as_array().unwrap().iter().find(|s| s["node"] == node).cloned().unwrap_or_default()
    };
    let w = find("xen-vsnd.work-vm.0.0.capture");
    assert_eq!((&w["allowed"], &w["policy"]["target"]), (&true.into(), &"second-sink".into()), "{w}");
    let u = find("xen-vsnd.untrusted-vm.0.0.playback");
    assert_eq!(u["policy"]["volume_cap"], 0.5, "{u}");
    assert_eq!(find("xen-vsnd.untrusted-vm.0.0.capture")["allowed"], false);
    let desc = env.dump().as_array().unwrap().iter().find_map(|o| {
        let p = &o["info"]["props"];
        (p["node.name"] == "xen-vsnd.untrusted-vm.0.0.playback").then(|| p["node.description"].clone())
    });
    assert_eq!(desc, Some("Untrusted VM".into()));
    for g in guests {
        let (ok, _, err) = finish_sim(g);
        assert!(ok, "{err}");
    }
}

/// A route made by hand (here pw-metadata, as pavucontrol does) is
/// remembered by WirePlumber per node name, so it comes back when the VM
/// connects again (its node is made anew with the same name).
#[test]
fn wireplumber_remembers_a_vms_route_across_reconnects() {
    let mut env = PwEnv::start_with_conf(SECOND_SINK);
    let (sock, _log) = env.start_backend();
    let node = "xen-vsnd.moved-vm.0.0.playback";
    let guest = spawn_playing_guest(&env, &sock, "moved-vm", 4.0, &[]);
    wait_until("the guest linked", Duration::from_secs(10), || !linked_to(&env, node).is_empty());
    assert_eq!(linked_to(&env, node), format!("{SINK}:playback_FL"));
    let id = env.node_id(node).unwrap().to_string();
    let serial = env
        .dump()
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["info"]["props"]["node.name"] == "second-sink")
        .map(|o| o["info"]["props"]["object.serial"].to_string())
        .unwrap();
    assert!(env.run("pw-metadata", &[&id, "target.object", &serial, "Spa:Id"]).status.success());
    wait_until("the move", Duration::from_secs(10), || linked_to(&env, node) == "second-sink:playback_FL");
    let (ok, _, err) = finish_sim(guest);
    assert!(ok, "{err}");
    wait_until("the node gone", Duration::from_secs(10), || !env.node_exists(node));
    let guest = spawn_playing_guest(&env, &sock, "moved-vm", 2.0, &[]);
    wait_until("the guest linked again", Duration::from_secs(10), || !linked_to(&env, node).is_empty());
    assert_eq!(linked_to(&env, node), "second-sink:playback_FL", "{}", env.links());
    let (ok, _, err) = finish_sim(guest);
    assert!(ok, "{err}");
}
