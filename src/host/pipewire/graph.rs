//! What the PipeWire thread knows about the graph around our nodes, from the
//! registry. Used for the one latency PipeWire does not report: a driver
//! sink's monitor ports carry what the sink received in the *previous*
//! cycle (the driver runs last in a cycle, its followers first), yet they
//! advertise no latency. A capture node fed from them is one cycle later
//! than PipeWire's time report says.

#![forbid(unsafe_code)]

use std::collections::HashMap;

#[derive(Debug, Default)]
pub struct Graph {
    /// Monitor ports (`port.monitor = true`) and the node they belong to.
    monitor_ports: HashMap<u32, u32>,
    /// Links: output port → input node.
    links: HashMap<u32, (u32, u32)>,
    /// The driver of each of our capture nodes (`node.driver-id`).
    driver_of: HashMap<u32, u32>,
}

/// The registry object kinds the graph cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    Port,
    Link,
    Other,
}

fn num(props: &dyn Fn(&str) -> Option<String>, key: &str) -> Option<u32> {
    props(key)?.trim().parse().ok()
}

impl Graph {
    /// Records a new registry global; `props` looks its properties up.
    pub fn add(&mut self, id: u32, kind: Kind, props: &dyn Fn(&str) -> Option<String>) {
        let is_true = |k: &str| props(k).is_some_and(|v| v == "true" || v == "1");
        if kind == Kind::Node {
            return; // nodes matter only through `set_driver`
        }
        match kind {
            Kind::Port if is_true("port.monitor") => {
                if let Some(node) = num(props, "node.id") {
                    self.monitor_ports.insert(id, node);
                }
            }
            Kind::Link => {
                if let (Some(out_port), Some(in_node)) =
                    (num(props, "link.output.port"), num(props, "link.input.node"))
                {
                    self.links.insert(id, (out_port, in_node));
                }
            }
            _ => {}
        }
    }

    /// Records which node drives input node `node` (from its info).
    pub fn set_driver(&mut self, node: u32, driver: Option<u32>) {
        match driver {
            Some(d) => self.driver_of.insert(node, d),
            None => self.driver_of.remove(&node),
        };
    }

    pub fn remove(&mut self, id: u32) {
        self.driver_of.remove(&id);
        self.monitor_ports.remove(&id);
        self.links.remove(&id);
    }

    /// Graph cycles of latency between a driver's monitor ports and input
    /// node `node` that PipeWire's own latency report leaves out (0 or 1).
    pub fn unreported_cycles(&self, node: u32) -> u32 {
        let Some(driver) = self.driver_of.get(&node) else { return 0 };
        let from_driver_monitor = |out_port: &u32| self.monitor_ports.get(out_port) == Some(driver);
        self.links.values().any(|(out_port, in_node)| *in_node == node && from_driver_monitor(out_port))
            as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props<'a>(kv: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| kv.iter().find(|(key, _)| *key == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn monitor_of_a_driver_is_one_cycle_late() {
        let mut g = Graph::default();
        g.set_driver(46, Some(30));
        g.add(31, Kind::Port, &props(&[("port.monitor", "true"), ("node.id", "30")]));
        g.add(32, Kind::Port, &props(&[("node.id", "30")]));
        g.add(50, Kind::Node, &props(&[]));
        g.add(51, Kind::Port, &props(&[("port.monitor", "true"), ("node.id", "50")]));
        assert_eq!(g.unreported_cycles(46), 0);
        g.add(60, Kind::Link, &props(&[("link.output.port", "32"), ("link.input.node", "46")]));
        assert_eq!(g.unreported_cycles(46), 0, "a sink's own output port is not a monitor");
        g.add(61, Kind::Link, &props(&[("link.output.port", "51"), ("link.input.node", "46")]));
        assert_eq!(g.unreported_cycles(46), 0, "monitor of a sink that does not drive the graph");
        g.add(62, Kind::Link, &props(&[("link.output.port", "31"), ("link.input.node", "46")]));
        assert_eq!(g.unreported_cycles(46), 1);
        assert_eq!(g.unreported_cycles(47), 0);
        g.set_driver(46, Some(50));
        assert_eq!(g.unreported_cycles(46), 1, "now the other sink drives");
        g.remove(61);
        assert_eq!(g.unreported_cycles(46), 0);
    }
}
