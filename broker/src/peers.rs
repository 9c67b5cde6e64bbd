//! Who is behind each ROUTER routing id.
//!
//! Services see small [`ConnId`]s; the ROUTER speaks routing ids. A ROUTER
//! never reports disconnects, so the socket monitor's DISCONNECTED and
//! ACCEPTED events (which carry the file descriptor) are matched against
//! the descriptor each peer's messages arrived on (libzmq's `__fd` message
//! property). Closing a socket frees its fd for reuse: an ACCEPTED on a
//! descriptor still on record means the old peer there is gone.

use std::collections::HashMap;
use zbroker_services::ConnId;

#[derive(Default)]
pub struct Peers {
    by_routing_id: HashMap<Vec<u8>, ConnId>,
    routing_ids: HashMap<ConnId, (Vec<u8>, Option<i32>)>,
    by_fd: HashMap<i32, Vec<ConnId>>,
    next: u64,
}

impl Peers {
    /// The connection for a routing id, created on first sight, and whether
    /// it is new.
    pub fn lookup(&mut self, routing_id: &[u8]) -> (ConnId, bool) {
        if let Some(id) = self.by_routing_id.get(routing_id) {
            return (*id, false);
        }
        self.next += 1;
        let id = ConnId(self.next);
        self.by_routing_id.insert(routing_id.to_vec(), id);
        self.routing_ids.insert(id, (routing_id.to_vec(), None));
        (id, true)
    }

    pub fn contains(&self, routing_id: &[u8]) -> bool {
        self.by_routing_id.contains_key(routing_id)
    }

    /// Records the descriptor a new peer's messages arrive on.
    pub fn set_fd(&mut self, id: ConnId, fd: i32) {
        if let Some(entry) = self.routing_ids.get_mut(&id) {
            entry.1 = Some(fd);
            self.by_fd.entry(fd).or_default().push(id);
        }
    }

    pub fn routing_id(&self, id: ConnId) -> Option<&[u8]> {
        self.routing_ids.get(&id).map(|(rid, _)| rid.as_slice())
    }

    /// Forgets every peer on a descriptor that closed; returns them.
    pub fn remove_fd(&mut self, fd: i32) -> Vec<ConnId> {
        let gone = self.by_fd.remove(&fd).unwrap_or_default();
        for id in &gone {
            if let Some((rid, _)) = self.routing_ids.remove(id) {
                self.by_routing_id.remove(&rid);
            }
        }
        gone
    }

    /// Unlinks every peer from a descriptor (it was closed and reused)
    /// without forgetting them; returns them.
    pub fn take_fd(&mut self, fd: i32) -> Vec<ConnId> {
        let gone = self.by_fd.remove(&fd).unwrap_or_default();
        for id in &gone {
            if let Some(entry) = self.routing_ids.get_mut(id) {
                entry.1 = None;
            }
        }
        gone
    }

    /// Forgets one peer (it was unreachable or misbehaved).
    pub fn remove(&mut self, id: ConnId) {
        if let Some((rid, fd)) = self.routing_ids.remove(&id) {
            self.by_routing_id.remove(&rid);
            if let Some(list) = fd.and_then(|fd| self.by_fd.get_mut(&fd)) {
                list.retain(|c| *c != id);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.routing_ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_map_back_to_connections() {
        let mut peers = Peers::default();
        let (a, new_a) = peers.lookup(b"\0a");
        let (b, _) = peers.lookup(b"\0b");
        assert!(new_a);
        assert_eq!(peers.lookup(b"\0a"), (a, false));
        peers.set_fd(a, 7);
        peers.set_fd(b, 8);
        assert_eq!(peers.remove_fd(7), vec![a]);
        assert_eq!(peers.routing_id(a), None);
        assert_eq!(peers.routing_id(b), Some(&b"\0b"[..]));
        // Same routing id later: a new connection.
        assert_ne!(peers.lookup(b"\0a").0, a);
        peers.remove(b);
        assert_eq!(peers.remove_fd(8), vec![]);
        assert_eq!(peers.len(), 1);
    }
}
