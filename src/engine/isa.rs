//! Which instruction set our own integer kernels run on: the best this CPU
//! has, found once at run time, optionally capped by `EDGEINFER_ISA` so that
//! every variant below the host's best can be tested and measured on it.
//!
//! Each architecture has a ladder, from the portable scalar reference up:
//! x86-64 `scalar < avx2 < avxvnni < avx512` (AVX-512 with VNNI), aarch64
//! `scalar < neon < dotprod` (SDOT), 32-bit ARM `scalar < neon` (VMULL and
//! VMLAL, with VFPv4). A cap names a rung of this machine's ladder; the
//! kernels used are the lower of it and the best the CPU has.

use std::fmt;
use std::sync::OnceLock;

/// The environment variable that caps the instruction set.
pub const ENV: &str = "EDGEINFER_ISA";

/// One rung of an architecture's ladder of kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain loops, on every CPU: the reference every other variant is tested against.
    Scalar,
    /// x86-64 AVX2 (Intel Haswell and later, AMD Zen 1-3).
    Avx2,
    /// x86-64 AVX2 with the 256-bit VNNI dot products (Intel Alder Lake and
    /// later, N100-class mini PCs).
    AvxVnni,
    /// x86-64 AVX-512 with VNNI (Ice Lake and later, AMD Zen 4).
    Avx512Vnni,
    /// aarch64 NEON without the dot product (Cortex-A53, Cortex-A72: Pi 3, Pi 4, Zero 2 W);
    /// on 32-bit ARM, NEON with VFPv4 (the same boards and the Pi 2 under 32-bit Raspberry Pi OS).
    Neon,
    /// aarch64 NEON with SDOT (Cortex-A55, Cortex-A76: Pi 5).
    NeonDot,
}

impl Isa {
    /// Every rung, lowest first per architecture.
    const ALL: [Isa; 6] = [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni, Isa::Neon, Isa::NeonDot];

    /// The name `EDGEINFER_ISA` takes and `inspect` shows.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512Vnni => "avx512",
            Isa::Neon => "neon",
            Isa::NeonDot => "dotprod",
        }
    }

    /// A longer description for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Isa::Scalar => "portable scalar",
            Isa::Avx2 => "x86 AVX2",
            Isa::AvxVnni => "x86 AVX-VNNI",
            Isa::Avx512Vnni => "x86 AVX-512 VNNI",
            Isa::Neon if cfg!(target_arch = "arm") => "armv7 NEON (VMLAL)",
            Isa::Neon => "aarch64 NEON (SMLAL)",
            Isa::NeonDot => "aarch64 NEON dot product (SDOT)",
        }
    }

    /// The rungs of this build's architecture, lowest first.
    pub fn ladder() -> &'static [Isa] {
        #[cfg(target_arch = "x86_64")]
        return &[Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni];
        #[cfg(target_arch = "aarch64")]
        return &[Isa::Scalar, Isa::Neon, Isa::NeonDot];
        #[cfg(target_arch = "arm")]
        return &[Isa::Scalar, Isa::Neon];
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")))]
        return &[Isa::Scalar];
    }

    /// Whether this CPU can run the rung's instructions.
    pub fn cpu_has(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::AvxVnni => Isa::Avx2.cpu_has() && std::arch::is_x86_feature_detected!("avxvnni"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            // NEON is part of the aarch64 baseline.
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => true,
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => std::arch::is_aarch64_feature_detected!("dotprod"),
            // Not in armv7's baseline; `is_arm_feature_detected!` is not stable.
            #[cfg(target_arch = "arm")]
            Isa::Neon => super::int8_conv::arm32_cpu_has_neon(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Every rung this CPU can run, lowest first: what the tests go through.
    pub fn available() -> Vec<Isa> {
        Self::ladder().iter().copied().filter(|i| i.cpu_has()).collect()
    }

    /// The rungs of the ladder this CPU lacks (tests say they skipped them).
    pub fn missing() -> Vec<Isa> {
        Self::ladder().iter().copied().filter(|i| !i.cpu_has()).collect()
    }

    /// Whether our integer convolutions beat tract's float kernels on this
    /// rung, so that they are put in graphs. The scalar reference is for
    /// tests and for `EDGEINFER_ISA=scalar`, which keeps tract's kernels.
    /// AVX2's `vpmaddwd` loops (`avx2`) are tested but not used yet:
    /// MobileNetV2 took more time on them than on tract's float path
    /// (docs/int8-kernels.md has the figures).
    pub fn has_int8_kernels(self) -> bool {
        !matches!(self, Isa::Scalar | Isa::Avx2)
    }

    /// Whether our int8 operators go in graphs in this process: on the rung
    /// in use ([`Isa::current`]) when it measured faster than tract's float
    /// path ([`Isa::has_int8_kernels`]), or on any rung but `scalar` when
    /// `EDGEINFER_ISA` names one, so that the others can be run and measured.
    pub fn int8_in_graphs() -> bool {
        let isa = Self::current();
        isa != Isa::Scalar && (isa.has_int8_kernels() || matches!(env_cap(), Ok(Some(_))))
    }

    /// The rung for a cap's text: one of this architecture's names.
    pub fn parse_cap(text: &str) -> Result<Isa, String> {
        let text = text.trim().to_ascii_lowercase();
        let names: Vec<&str> = Self::ladder().iter().map(|i| i.name()).collect();
        match Self::ALL.iter().find(|i| i.name() == text) {
            Some(&isa) if Self::ladder().contains(&isa) => Ok(isa),
            Some(_) => Err(format!("{ENV}={text} is for another architecture; this build takes {}", names.join(", "))),
            None => Err(format!("{ENV}={text} is not an instruction set; this build takes {}", names.join(", "))),
        }
    }

    /// The best rung this CPU has, at most `cap`.
    pub fn best_up_to(cap: Option<Isa>) -> Isa {
        Self::available().into_iter().rev().find(|&i| cap.is_none_or(|c| i <= c)).unwrap_or(Isa::Scalar)
    }

    /// The rung our kernels use in this process: the best this CPU has,
    /// capped by `EDGEINFER_ISA` when set. An unknown value is an error
    /// (reported by [`check_env`] at load), treated here as no cap.
    pub fn current() -> Isa {
        static CURRENT: OnceLock<Isa> = OnceLock::new();
        *CURRENT.get_or_init(|| Self::best_up_to(env_cap().ok().flatten()))
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The cap `EDGEINFER_ISA` sets, if any; an error naming the variable and the
/// accepted values when its value is none of them.
pub fn env_cap() -> Result<Option<Isa>, String> {
    match std::env::var(ENV) {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => Isa::parse_cap(&v).map(Some),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{ENV} is not valid UTF-8")),
    }
}

/// Checks `EDGEINFER_ISA` once per load, so that a typo stops the program
/// with a clear line instead of silently running another variant.
pub fn check_env() -> Result<(), String> {
    env_cap().map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_parse_by_name_on_this_architecture_only() {
        for &isa in Isa::ladder() {
            assert_eq!(Isa::parse_cap(isa.name()), Ok(isa));
            assert_eq!(Isa::parse_cap(&isa.name().to_uppercase()), Ok(isa));
        }
        let err = Isa::parse_cap("sse9").unwrap_err();
        assert!(err.contains("EDGEINFER_ISA=sse9") && err.contains("scalar"), "{err}");
        let foreign = if cfg!(target_arch = "x86_64") { "neon" } else { "avx2" };
        assert!(Isa::parse_cap(foreign).unwrap_err().contains("another architecture"));
    }

    #[test]
    fn a_cap_never_raises_the_rung_above_what_the_cpu_has() {
        let best = Isa::best_up_to(None);
        assert!(best.cpu_has());
        assert_eq!(Isa::best_up_to(Some(Isa::Scalar)), Isa::Scalar);
        for &cap in Isa::ladder() {
            let got = Isa::best_up_to(Some(cap));
            assert!(got <= cap && got <= best && got.cpu_has(), "cap {cap}: {got}");
        }
        println!("this CPU: available {:?}, missing {:?}", Isa::available(), Isa::missing());
    }

    /// CI runs the ARM tests on emulated CPUs with and without the dot
    /// product and names the best rung each must have, so that a detection
    /// that failed cannot pass for a CPU that lacks it.
    #[test]
    fn the_cpu_has_the_rung_ci_expects() {
        let Ok(want) = std::env::var("EDGEINFER_EXPECT_ISA") else {
            println!("EDGEINFER_EXPECT_ISA unset: best rung here {}", Isa::best_up_to(None));
            return;
        };
        let want = Isa::parse_cap(&want).unwrap();
        assert_eq!(Isa::best_up_to(None), want, "available {:?}", Isa::available());
    }
}
