//! The snd-xen-vsnd cards of this guest and their "Host Delay" controls:
//! the delay dom0 reported last for each stream, in microseconds, announced
//! by the driver when it moves by a millisecond or more.

use alsa::ctl::{Ctl, ElemId, ElemIface, ElemType, ElemValue};
use alsa::poll::Descriptors;
use std::collections::HashMap;

/// The ALSA driver name snd-xen-vsnd's cards carry.
pub const DRIVER: &str = "XenVsnd";

/// One stream of a card: card number, PCM device, subdevice, direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub card: i32,
    pub device: u32,
    pub subdevice: u32,
    pub capture: bool,
}

/// A card's control device and its delay controls.
struct Card {
    index: i32,
    ctl: Ctl,
    controls: Vec<(StreamKey, ElemId)>,
}

impl Card {
    fn open(index: i32) -> Option<Card> {
        let ctl = Ctl::from_card(&alsa::Card::new(index), true).ok()?;
        if ctl.card_info().ok()?.get_driver().ok()? != DRIVER {
            return None;
        }
        let list = ctl.elem_list().ok()?;
        let mut controls = Vec::new();
        for i in 0..list.get_used() {
            let (Ok(name), Ok(ElemIface::PCM)) = (list.get_name(i), list.get_interface(i)) else { continue };
            let capture = match name {
                "Playback Host Delay" => false,
                "Capture Host Delay" => true,
                _ => continue,
            };
            let (Ok(device), Ok(subdevice), Ok(id)) =
                (list.get_device(i), list.get_subdevice(i), list.get_id(i))
            else {
                continue;
            };
            controls.push((StreamKey { card: index, device, subdevice, capture }, id));
        }
        ctl.subscribe_events(true).ok()?;
        Some(Card { index, ctl, controls })
    }

    /// Every control's value now (µs; a capture's can be below zero);
    /// None when the card went away.
    fn read(&self) -> Option<Vec<(StreamKey, i32)>> {
        let mut out = Vec::new();
        for (key, id) in &self.controls {
            let mut v = ElemValue::new(ElemType::Integer).ok()?;
            v.set_id(id);
            self.ctl.elem_read(&mut v).ok()?;
            out.push((*key, v.get_integer(0)?));
        }
        Some(out)
    }

    /// Drains pending events; false when the card went away.
    fn drain(&self) -> bool {
        loop {
            match self.ctl.read() {
                Ok(Some(_)) => continue,
                Ok(None) => return true,
                Err(e) => return e.errno() == libc::EAGAIN,
            }
        }
    }
}

/// Follows every snd-xen-vsnd card (cards come and go with the backend)
/// and calls `changed` with each stream's delay whenever it differs from
/// the last one given. Never returns.
pub fn follow(mut changed: impl FnMut(StreamKey, i32)) -> ! {
    let mut cards: HashMap<i32, Card> = HashMap::new();
    let mut last: HashMap<StreamKey, i32> = HashMap::new();
    loop {
        // New cards (a card that appears after a reconnect has a new number
        // or the old one again).
        for c in alsa::card::Iter::new().filter_map(Result::ok) {
            if let std::collections::hash_map::Entry::Vacant(slot) = cards.entry(c.get_index()) {
                if let Some(card) = Card::open(*slot.key()) {
                    tracing::info!(
                        card = card.index,
                        streams = card.controls.len(),
                        "following a snd-xen-vsnd card"
                    );
                    slot.insert(card);
                }
            }
        }
        // Wait for an announcement (or the next look for cards).
        let mut fds = Vec::new();
        for c in cards.values() {
            fds.extend(Descriptors::get(&c.ctl).unwrap_or_default());
        }
        let _ = alsa::poll::poll(&mut fds, 1000);
        cards.retain(|_, c| {
            let alive = c.drain();
            let values = if alive { c.read() } else { None };
            match values {
                Some(values) => {
                    for (key, us) in values {
                        if last.insert(key, us) != Some(us) {
                            changed(key, us);
                        }
                    }
                    true
                }
                None => {
                    tracing::info!(card = c.index, "card gone");
                    last.retain(|k, _| k.card != c.index);
                    false
                }
            }
        });
    }
}
