# CUDA-capable image: torch's wheels bring their own CUDA runtime; the host needs the NVIDIA driver.
FROM python:3.11-slim
WORKDIR /opt/tcube-lightning
ENV HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
# ImageMagick's library, for medmnistc's on-the-fly corruptions; its version follows the base image's Debian.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends libmagickwand-6.q16-6 \
    && rm -rf /var/lib/apt/lists/*
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md main.py ./
COPY tcube_lightning ./tcube_lightning
COPY configs ./configs
RUN pip install --no-cache-dir --no-deps .
ENTRYPOINT ["python", "main.py"]
CMD ["test", "--help"]
