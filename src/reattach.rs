//! dom0, after a driver domain was restarted: give its guests their cards
//! again.
//!
//! A restarted driver domain is a new domain (a new id); libxl does not
//! attach the devices it served again, and a guest's frontend keeps
//! waiting on the old backend's directory. `xen-vsnd reattach` finds every
//! vsnd card whose backend directory is gone (from libxl's own record under
//! `/libxl`, which only dom0 writes), and when a domain of the backend's
//! name runs again, attaches the card again and detaches the old one
//! (libxl then only cleans up the guest's side), with the configuration taken from
//! the domain configuration dom0 keeps (`xl list -l`), never from the
//! guest's directories. It runs `xl`, so as root.

#![forbid(unsafe_code)]

use crate::xen::XenStore;
use anyhow::{bail, Context};
use serde_json::Value;
use std::process::Command;

/// A card whose backend directory is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dangling {
    pub domid: u32,
    pub devid: u32,
}

/// Every vsnd card libxl attached whose backend directory no longer exists.
pub fn dangling(store: &dyn XenStore) -> Vec<Dangling> {
    let mut out = Vec::new();
    for domid in store.child_ids("/libxl") {
        for devid in store.child_ids(&format!("/libxl/{domid}/device/vsnd")) {
            let Ok(Some(be)) = store.read(&format!("/libxl/{domid}/device/vsnd/{devid}/backend")) else {
                continue;
            };
            if store.read(&format!("{be}/frontend-id")).ok().flatten().is_none() {
                out.push(Dangling { domid, devid });
            }
        }
    }
    out
}

/// The `xl vsnd-attach` items (CARD, PCM, STREAM...) for a card of
/// libxl's JSON domain configuration, and the backend's name.
pub fn attach_items(card: &Value) -> anyhow::Result<(String, Vec<String>)> {
    let backend = card["backend_domname"].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let Some(backend) = backend else {
        bail!("the card names its backend by id only (backend=<name> in xl.cfg)")
    };
    let mut card_item = vec!["CARD".to_owned(), pair("backend", &backend)?];
    for (key, json) in [("short-name", "short_name"), ("long-name", "long_name")] {
        if let Some(v) = card[json].as_str() {
            card_item.push(pair(key, v)?);
        }
    }
    card_item.extend(params(&card["params"])?);
    let mut items = vec![card_item.join(", ")];
    for pcm in card["pcms"].as_array().into_iter().flatten() {
        let mut item = vec!["PCM".to_owned()];
        if let Some(name) = pcm["name"].as_str() {
            item.push(pair("name", name)?);
        }
        item.extend(params(&pcm["params"])?);
        items.push(item.join(", "));
        for stream in pcm["streams"].as_array().into_iter().flatten() {
            let mut item = vec!["STREAM".to_owned()];
            if let Some(id) = stream["unique_id"].as_str() {
                item.push(pair("unique-id", id)?);
            }
            if let Some(t) = stream["type"].as_str() {
                item.push(pair("type", &t.to_ascii_lowercase())?);
            }
            item.extend(params(&stream["params"])?);
            items.push(item.join(", "));
        }
    }
    Ok((backend, items))
}

/// `key=value`, refusing what xl's item syntax would split.
fn pair(key: &str, value: &str) -> anyhow::Result<String> {
    if value.contains([',', '=', '\n']) {
        bail!("{key}: {value:?} cannot be written as an xl item");
    }
    Ok(format!("{key}={value}"))
}

fn params(p: &Value) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| {
                x.as_u64().map(|n| n.to_string()).or_else(|| x.as_str().map(str::to_ascii_lowercase))
            })
            .collect()
    };
    for (key, json) in [("sample-rates", "sample_rates"), ("sample-formats", "sample_formats")] {
        let l = list(&p[json]);
        if !l.is_empty() {
            out.push(pair(key, &l.join(";"))?);
        }
    }
    for (key, json) in
        [("channels-min", "channels_min"), ("channels-max", "channels_max"), ("buffer-size", "buffer_size")]
    {
        if let Some(n) = p[json].as_u64().filter(|&n| n > 0) {
            out.push(pair(key, &n.to_string())?);
        }
    }
    Ok(out)
}

/// The card `devid` of domain `domid` in `xl list -l`'s JSON.
fn card_config(domid: u32, devid: u32) -> anyhow::Result<Value> {
    let out = Command::new("xl").args(["list", "-l", &domid.to_string()]).output().context("running xl")?;
    if !out.status.success() {
        bail!("xl list -l {domid}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let json: Value = serde_json::from_slice(&out.stdout).context("xl list -l: not JSON")?;
    find_card(&json, devid).with_context(|| format!("no vsnd card {devid} in domain {domid}'s configuration"))
}

/// The vsnd entry with `devid` (a card without one is devid 0) anywhere
/// in the JSON (xl wraps the configuration in a list of domains).
fn find_card(json: &Value, devid: u32) -> Option<Value> {
    match json {
        Value::Object(m) => {
            if let Some(cards) = m.get("vsnds").and_then(Value::as_array) {
                let hit = cards.iter().find(|c| c["devid"].as_u64().unwrap_or(0) == u64::from(devid));
                if let Some(c) = hit {
                    return Some(c.clone());
                }
            }
            m.values().find_map(|v| find_card(v, devid))
        }
        Value::Array(a) => a.iter().find_map(|v| find_card(v, devid)),
        _ => None,
    }
}

fn xl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("xl").args(args).output().context("running xl")?;
    if !out.status.success() {
        bail!("xl {}: {}", args[0], String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Attaches again every dangling card whose backend domain runs again
/// (only those of `only_backend` if given). Returns how many were.
pub fn run(store: &dyn XenStore, only_backend: Option<&str>, dry_run: bool) -> anyhow::Result<usize> {
    let (mut done, mut failed) = (0, 0);
    for d in dangling(store) {
        let what = format!("domain {} card {}", d.domid, d.devid);
        let (backend, items) = match card_config(d.domid, d.devid).and_then(|c| attach_items(&c)) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("reattach: {what}: {e:#}");
                continue;
            }
        };
        if only_backend.is_some_and(|b| b != backend) {
            continue;
        }
        let running = Command::new("xl").args(["domid", &backend]).output().is_ok_and(|o| o.status.success());
        if !running {
            eprintln!("reattach: {what}: its backend domain {backend} does not run (yet)");
            continue;
        }
        let (dom, dev) = (d.domid.to_string(), d.devid.to_string());
        let mut attach = vec!["vsnd-attach", dom.as_str()];
        attach.extend(items.iter().map(String::as_str));
        // Attach first, then detach the old card: the new one gets a device
        // id of its own. Detached first, the guest's driver, letting go of
        // the old device with its backend gone, wrote Closed into the new
        // device's directory at the same path (seen under real Xen).
        if dry_run {
            println!("xl {}", attach.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(" "));
            println!("xl vsnd-detach {dom} {dev}");
        } else if let Err(e) = xl(&attach).and_then(|_| xl(&["vsnd-detach", &dom, &dev])) {
            // The other cards are still worth attaching.
            eprintln!("reattach: {what}: {e:#}");
            failed += 1;
            continue;
        } else {
            println!("reattach: {what}: attached again to {backend}");
        }
        done += 1;
    }
    if failed > 0 {
        bail!("{failed} card(s) could not be attached again ({done} were)");
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::loopback::Hypervisor;

    /// A card as libxl keeps it (the shape of `xl list -l`).
    fn listed() -> Value {
        serde_json::json!([{ "domid": 7, "config": { "c_info": { "name": "work-vm" }, "vsnds": [{
            "backend_domid": 3, "backend_domname": "sys-audio", "short_name": "XenSnd",
            "long_name": "Xen PV Sound",
            "params": { "sample_rates": [44100, 48000], "sample_formats": ["s16_le", "s32_le"],
                        "channels_min": 1, "channels_max": 2, "buffer_size": 524288 },
            "pcms": [{ "name": "dev0", "streams": [
                { "unique_id": "work-play", "type": "p" }, { "unique_id": "work-cap", "type": "c" } ] }]
        }]}}])
    }

    #[test]
    fn items_say_what_xl_cfg_said() {
        let card = find_card(&listed(), 0).unwrap();
        let (backend, items) = attach_items(&card).unwrap();
        assert_eq!(backend, "sys-audio");
        assert_eq!(
            items,
            [
                "CARD, backend=sys-audio, short-name=XenSnd, long-name=Xen PV Sound, sample-rates=44100;48000, \
                 sample-formats=s16_le;s32_le, channels-min=1, channels-max=2, buffer-size=524288",
                "PCM, name=dev0",
                "STREAM, unique-id=work-play, type=p",
                "STREAM, unique-id=work-cap, type=c",
            ]
        );
        assert!(find_card(&listed(), 1).is_none());
    }

    #[test]
    fn nothing_is_written_that_xl_would_split_or_guess() {
        let mut card = find_card(&listed(), 0).unwrap();
        card["pcms"][0]["name"] = "dev0, backend=other".into();
        assert!(attach_items(&card).is_err());
        card["backend_domname"] = Value::Null;
        assert!(attach_items(&card).unwrap_err().to_string().contains("by id only"));
    }

    #[test]
    fn a_card_is_dangling_when_its_backend_directory_is_gone() {
        let (_hv, t) = Hypervisor::new_transport();
        let s = &*t.store;
        for (dom, be) in [(7, 3), (8, 0)] {
            let path = format!("/local/domain/{be}/backend/vsnd/{dom}/0");
            s.write(&format!("/libxl/{dom}/device/vsnd/0/backend"), &path).unwrap();
            s.write(&format!("{path}/frontend-id"), &dom.to_string()).unwrap();
        }
        assert!(dangling(s).is_empty());
        // The driver domain (3) went away with its directories.
        s.rm("/local/domain/3").unwrap();
        assert_eq!(dangling(s), [Dangling { domid: 7, devid: 0 }]);
    }
}
