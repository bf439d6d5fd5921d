//! A guest stream's life as the vsnd protocol (sndif.h) defines it, as one
//! type with checked transitions. `PcmStream` moves through it on every
//! OPEN, TRIGGER and CLOSE, and the host's node follows: an engine runs in
//! the node from OPEN to CLOSE, and its position moves only while Running.

#![forbid(unsafe_code)]

use crate::sndif::trigger;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No OPEN yet, or CLOSE since: no buffer, no engine.
    Closed,
    /// OPEN accepted (the frontend's prepare): buffer mapped, engine in the
    /// host's node, position 0 and not moving.
    Prepared,
    /// TRIGGER START or RESUME: the position moves with the host's clock.
    Running,
    /// TRIGGER PAUSE: the position holds; RESUME goes on from it.
    Paused,
    /// TRIGGER STOP: the position holds; START moves it again.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Open,
    Close,
    /// A TRIGGER and its type (`XENSND_OP_TRIGGER_*`).
    Trigger(u8),
}

impl Phase {
    /// The phase after `event`, or why the protocol does not allow it.
    pub fn next(self, event: Event) -> Result<Phase, String> {
        use Phase::*;
        Ok(match (self, event) {
            // XENSND_OP_OPEN. Again while open: every Linux frontend sends
            // it when an application sets its hw_params twice, without
            // CLOSE in between; it stands for CLOSE + OPEN.
            (_, Event::Open) => Prepared,
            // XENSND_OP_CLOSE: always allowed, also when closed.
            (_, Event::Close) => Closed,
            (Closed, Event::Trigger(_)) => return Err("TRIGGER before OPEN".into()),
            (_, Event::Trigger(t)) => match (self, t) {
                // START: from prepare or after a STOP (ALSA's drop +
                // prepare does not OPEN again); again while running is
                // harmless.
                (Prepared | Stopped | Running, trigger::START) => Running,
                // RESUME: after PAUSE (pause release) or a suspend (which
                // the frontend sends as PAUSE); again while running is
                // harmless.
                (Paused | Running, trigger::RESUME) => Running,
                (Running | Paused, trigger::PAUSE) => Paused,
                // STOP: from anywhere open (ALSA's drop after a drain).
                (_, trigger::STOP) => Stopped,
                (_, trigger::START | trigger::RESUME | trigger::PAUSE) => {
                    return Err(format!("TRIGGER {} while {self:?}", trigger_name(t)))
                }
                (_, other) => return Err(format!("TRIGGER: unknown type {other}")),
            },
        })
    }

    pub fn is_open(self) -> bool {
        self != Phase::Closed
    }

    pub fn is_running(self) -> bool {
        self == Phase::Running
    }
}

fn trigger_name(t: u8) -> &'static str {
    match t {
        trigger::START => "START",
        trigger::PAUSE => "PAUSE",
        trigger::STOP => "STOP",
        trigger::RESUME => "RESUME",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event::*;
    use Phase::*;

    fn run(events: &[Event]) -> Result<Phase, String> {
        events.iter().try_fold(Closed, |p, e| p.next(*e))
    }

    #[test]
    fn what_linux_frontends_send_is_accepted() {
        let (start, pause, stop, resume) = (
            Trigger(trigger::START),
            Trigger(trigger::PAUSE),
            Trigger(trigger::STOP),
            Trigger(trigger::RESUME),
        );
        assert_eq!(run(&[Open, start, stop, Close]), Ok(Closed));
        assert_eq!(run(&[Open, start, pause, resume]), Ok(Running));
        assert_eq!(run(&[Open, Open, start]), Ok(Running), "hw_params twice");
        assert_eq!(run(&[Open, start, stop, start]), Ok(Running), "drop + prepare + start");
        assert_eq!(run(&[Open, stop, Close, Close]), Ok(Closed));
        assert_eq!(run(&[Open, start, Open]), Ok(Prepared));
    }

    #[test]
    fn what_the_protocol_does_not_allow_is_refused() {
        assert!(run(&[Trigger(trigger::START)]).is_err(), "before OPEN");
        assert!(run(&[Open, Trigger(trigger::PAUSE)]).is_err(), "nothing to pause");
        assert!(run(&[Open, Trigger(trigger::RESUME)]).is_err(), "nothing paused");
        assert!(run(&[Open, Trigger(9)]).is_err());
        assert!(
            run(&[Open, Trigger(trigger::START), Trigger(trigger::PAUSE), Trigger(trigger::START)]).is_err()
        );
    }
}
