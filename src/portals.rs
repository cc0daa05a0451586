//! The addresses a portal can be reached on. A wildcard bind (`0.0.0.0`, `::`) listens on every
//! interface, but `0.0.0.0` is no address a device can be handed: the control plane reports the
//! default-route interface's address instead (or 127.0.0.1 without a default route), and
//! SendTargets and `get_portals` list every interface's address (RFC 7143 TargetAddress, one
//! key per address).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The address to hand to initiators for a portal bound to `local`: `local` itself, or for a
/// wildcard bind the default-route interface's address, else 127.0.0.1.
pub fn advertised(local: SocketAddr) -> SocketAddr {
    if !local.ip().is_unspecified() {
        return local;
    }
    let ip = crate::config::default_route_addr().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(ip, local.port())
}

/// Every address a portal bound to `local` is reachable on, the advertised one first: `local`
/// itself, or for a wildcard bind each interface's address (IPv4 for `0.0.0.0`; IPv4 and IPv6
/// for `::`, which also takes IPv4 connections), link-local IPv6 left out (it needs a scope).
pub fn portals(local: SocketAddr) -> Vec<SocketAddr> {
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let first = advertised(local);
    let mut out = vec![first];
    for ip in interface_addrs() {
        let usable = match ip {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => local.is_ipv6() && (v6.segments()[0] & 0xffc0) != 0xfe80,
        };
        let addr = SocketAddr::new(ip, local.port());
        if usable && !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// The addresses of this network namespace's interfaces that are up, in the kernel's order.
fn interface_addrs() -> Vec<IpAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        log::warn!("getifaddrs: {}", std::io::Error::last_os_error());
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_UP as u32 == 0 {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family == libc::AF_INET {
            // SAFETY: an AF_INET address is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            out.push(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()));
        } else if family == libc::AF_INET6 {
            // SAFETY: an AF_INET6 address is a sockaddr_in6.
            let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_specific_bind_is_its_own_only_portal() {
        let a: SocketAddr = "127.0.0.1:3260".parse().unwrap();
        assert_eq!(advertised(a), a);
        assert_eq!(portals(a), vec![a]);
    }

    #[test]
    fn a_wildcard_bind_lists_loopback_and_never_the_wildcard() {
        let any: SocketAddr = "0.0.0.0:3260".parse().unwrap();
        let adv = advertised(any);
        assert!(!adv.ip().is_unspecified() && adv.port() == 3260, "{adv}");
        let all = portals(any);
        assert_eq!(all[0], adv);
        assert!(all.contains(&"127.0.0.1:3260".parse().unwrap()), "{all:?}");
        assert!(all.iter().all(|a| a.is_ipv4() && !a.ip().is_unspecified()), "{all:?}");
    }
}
